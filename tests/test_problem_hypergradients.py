"""Every estimator against the exact hypergradient on the shipped problems, in float64.

"exact" is the implicit formula at the current y with a dense solve; on the quadratic it is also
checked against the closed form grad h(x) at y = y*(x).
"""
import pytest
import torch

from bilevel import hypergradient, tree
from bilevel.problems.hyperclean_digits import HypercleanDigits
from bilevel.problems.quadratic import Quadratic


def _random_like(t, generator, scale=0.3):
    return {k: scale * torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in t.items()}


@pytest.fixture(scope="module")
def quadratic():
    problem = Quadratic(n_samples_inner=128, n_samples_outer=128, dim_inner=8, dim_outer=4, dtype="float64")
    g = torch.Generator().manual_seed(1)
    x = _random_like({"x": torch.zeros(4, dtype=torch.float64)}, g, 1.0)
    y = tree.add(problem.y_star(x), _random_like({"z": torch.zeros(8, dtype=torch.float64)}, g))
    return problem, x, y


@pytest.fixture(scope="module")
def digits():
    problem = HypercleanDigits(n_train=100, n_val=50, n_test=50, reg=0.1, dtype="float64",
                               batch_size=None, val_batch_size=None)
    g = torch.Generator().manual_seed(2)
    x0, y0 = problem.init(g)
    return problem, _random_like(x0, g, 1.0), _random_like(y0, g, 0.1)


# (method, options for a converged estimate, lr) per problem: lr below 1/L of the lower Hessian
# (L ~ 1 for the quadratic, ~0.6 for digits with reg 0.1).
CONVERGED = {
    "quadratic": {"cg": dict(steps=8), "neumann": dict(lr=1.0, steps=600), "linear_sgd": dict(lr=1.0, steps=600),
                  "fixed_point": dict(lr=1.0, steps=600)},
    "digits": {"cg": dict(steps=200), "neumann": dict(lr=1.5, steps=200), "linear_sgd": dict(lr=1.5, steps=200),
               "fixed_point": dict(lr=1.5, steps=200)},
}


@pytest.fixture(scope="module")
def exact_reference(quadratic, digits):
    """The dense-solve hypergradient of each problem at its test point (computed once)."""
    return {name: hypergradient(problem, x, y, None, None, method="exact")
            for name, (problem, x, y) in (("quadratic", quadratic), ("digits", digits))}


@pytest.mark.parametrize("name", ["quadratic", "digits"])
@pytest.mark.parametrize("method", ["cg", "neumann", "linear_sgd", "fixed_point"])
def test_converged_estimators_match_exact(request, exact_reference, name, method):
    problem, x, y = request.getfixturevalue(name)
    reference = exact_reference[name]
    estimate = hypergradient(problem, x, y, None, None, method=method, **CONVERGED[name][method])
    assert tree.relative_error(estimate, reference) < 1e-6


@pytest.mark.parametrize("name", ["quadratic", "digits"])
@pytest.mark.parametrize("method", ["cg", "neumann", "linear_sgd", "fixed_point"])
def test_error_shrinks_as_steps_grow(request, exact_reference, name, method):
    problem, x, y = request.getfixturevalue(name)
    reference = exact_reference[name]
    options = dict(CONVERGED[name][method])
    final = options.pop("steps")
    errors = [tree.relative_error(hypergradient(problem, x, y, None, None, method=method, steps=s, **options),
                                  reference) for s in (1, max(2, final // 8), max(3, final // 2), final)]
    assert all(later <= earlier * (1 + 1e-9) or later < 1e-12 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3 * errors[0], errors


def test_exact_at_lower_solution_is_the_closed_form(quadratic):
    problem, x, _ = quadratic
    y_star = problem.y_star(x)
    exact = hypergradient(problem, x, y_star, None, None, method="exact")
    assert tree.relative_error(exact, problem.hypergradient_closed_form(x)) < 1e-10


def test_randomized_neumann_is_unbiased_on_average(quadratic):
    problem, x, y = quadratic
    total = hypergradient(problem, x, y, None, None, method="neumann", lr=1.0, steps=6)
    g = torch.Generator().manual_seed(0)
    draws = [hypergradient(problem, x, y, None, None, method="neumann", lr=1.0, steps=6, variant="randomized",
                           generator=g) for _ in range(600)]
    mean = {k: torch.stack([d[k] for d in draws]).mean(0) for k in total}
    assert tree.relative_error(mean, total) < 0.05


def test_itd_with_many_steps_approaches_exact_at_lower_solution(quadratic):
    problem, x, _ = quadratic
    closed = problem.hypergradient_closed_form(x)
    y0 = problem.y_star(x)
    errors = [tree.relative_error(hypergradient(problem, x, y0, None, None, method="itd", lr=1.0, steps=k), closed)
              for k in (5, 40, 400)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6, errors


def test_stochastic_batches_pass_through_untouched(quadratic):
    """A mini-batch estimate equals the exact hypergradient of the mini-batch losses."""
    problem, x, y = quadratic
    g = torch.Generator().manual_seed(5)
    upper_batch, lower_batch = problem.sample("upper", g), problem.sample("lower", g)
    exact = hypergradient(problem, x, y, upper_batch, lower_batch, method="exact")
    full = hypergradient(problem, x, y, None, None, method="exact")
    cg = hypergradient(problem, x, y, upper_batch, lower_batch, method="cg", steps=8)
    assert tree.relative_error(cg, exact) < 1e-6
    assert tree.relative_error(exact, full) > 1e-3  # the batch really changed the estimate


def test_forward_mode_matches_reverse_on_digits(digits):
    problem, x, y = digits
    rev = hypergradient(problem, x, y, None, None, method="cg", steps=30)
    fwd = hypergradient(problem, x, y, None, None, method="cg", steps=30, hvp_mode="forward")
    assert tree.relative_error(fwd, rev) < 1e-10

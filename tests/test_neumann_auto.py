"""``neumann_lr="auto"`` (bilevel.spectrum): power iteration on a batch Hessian, counted HVPs,
the step resolved once at init and kept in the state, validation of the field."""
import pytest
import torch

import bilevel
from bilevel import count_calls, spectrum
from bilevel.problem import FunctionProblem
from bilevel.problems.quadratic import Quadratic


def quadratic(batch_size=16):
    return Quadratic(n_samples_inner=256, n_samples_outer=256, dim_inner=10, dim_outer=5, batch_size=batch_size,
                     mu_inner=0.5)


def test_power_iteration_finds_the_batch_hessians_largest_eigenvalue():
    problem = quadratic()
    x, y = problem.init(None)
    g = torch.Generator().manual_seed(0)
    batch = problem.sample("lower", g)
    r = problem.lower_samples.r[batch]
    largest = float(torch.linalg.eigvalsh(r.T @ r / len(batch))[-1])  # d2_zz g on this batch
    with count_calls() as counts:
        estimate = spectrum.largest_eigenvalue(problem, x, y, batch, iterations=30, generator=g)
    assert counts["hvp"] == 30
    assert 0.98 * largest <= estimate <= largest * (1 + 1e-12)
    mean_largest = float(torch.linalg.eigvalsh(problem.lower_mean.A)[-1])
    assert estimate > mean_largest  # a batch Hessian's top eigenvalue exceeds the mean's


def test_auto_step_draws_from_the_run_generator():
    """auto_step = 1 / L_hat on one lower batch and a Gaussian start, both from the generator."""
    problem = quadratic()
    x, y = problem.init(None)
    g = torch.Generator().manual_seed(3)
    twin = torch.Generator()
    twin.set_state(g.get_state())
    step = spectrum.auto_step(problem, x, y, g)
    batch = problem.sample("lower", twin)
    assert step == 1.0 / spectrum.largest_eigenvalue(problem, x, y, batch, generator=twin)
    assert torch.equal(g.get_state(), twin.get_state())


def test_zero_hessian_asks_for_a_number():
    problem = FunctionProblem(lambda x, y, b: (y["w"] ** 2).sum(), lambda x, y, b: (x["l"] * y["w"]).sum(),
                              {"l": torch.ones(2)}, {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="give the step size as a number"):
        spectrum.auto_step(problem, *problem.init(None), torch.Generator())


@pytest.mark.parametrize("name", ["stocbio", "bo-rep", "slip", "adambo", "bsa", "ttsa", "accbo", "mrbo", "sustain",
                                  "vrbo"])
def test_auto_is_resolved_once_at_init_and_counted(name):
    """The default neumann_lr "auto" becomes one number in state.resolved at init (20 HVPs
    counted there); the solver's field keeps "auto"; an explicit number needs no estimate."""
    problem = quadratic()
    solver = bilevel.make_solver(name)
    assert solver.neumann_lr == "auto"
    g = torch.Generator().manual_seed(0)
    with count_calls() as auto:
        state = solver.init(problem, *problem.init(g), g)
    step = state.resolved["neumann_lr"]
    assert isinstance(step, float) and 0.3 < step < 1.2  # 1 / (a batch Hessian's top eigenvalue, about 1.4)
    numeric = bilevel.make_solver(name, neumann_lr=step)
    g = torch.Generator().manual_seed(0)
    with count_calls() as fixed:
        numeric_state = numeric.init(problem, *problem.init(g), g)
    assert numeric_state.resolved is None
    if name == "sustain":  # its init evaluates h with a random q, which the estimate's draws shift
        assert auto["hvp"] >= spectrum.AUTO_ITERATIONS
    else:
        assert auto["hvp"] - fixed["hvp"] == spectrum.AUTO_ITERATIONS
    next_state = solver.step(problem, state)
    assert next_state.resolved == state.resolved


def test_auto_step_equals_the_same_number_given_explicitly():
    """After init, a run with "auto" makes the steps of a run given the resolved number (same
    draws once the estimate's batch and start vector are consumed)."""
    problem = quadratic()
    solver = bilevel.make_solver("stocbio", inner_steps=2, neumann_steps=3)
    g = torch.Generator().manual_seed(0)
    state = solver.init(problem, *problem.init(g), g)
    twin_state = state._replace(resolved=None, generator=torch.Generator())
    twin_state.generator.set_state(state.generator.get_state())
    numeric = bilevel.make_solver("stocbio", inner_steps=2, neumann_steps=3, neumann_lr=state.resolved["neumann_lr"])
    for _ in range(3):
        state, twin_state = solver.step(problem, state), numeric.step(problem, twin_state)
    torch.testing.assert_close(state.x, twin_state.x, rtol=0, atol=0)


@pytest.mark.parametrize("name, field", [("stocbio", "neumann_lr"), ("bo-rep", "z_lr"), ("mrbo", "neumann_lr"),
                                         ("vrbo", "neumann_lr"), ("sustain", "neumann_lr"), ("ttsa", "neumann_lr"),
                                         ("adambo", "neumann_lr"), ("accbo", "neumann_lr")])
@pytest.mark.parametrize("value", ["Auto", "1/L", ""])
def test_other_strings_are_rejected(name, field, value):
    with pytest.raises(ValueError, match=f"{field} must be a positive number or 'auto'"):
        bilevel.make_solver(name, **{field: value})


def test_linear_sgd_z_lr_auto():
    """BO-REP's linear-system SGD accepts z_lr="auto" (1/L like the Neumann step)."""
    problem = quadratic()
    solver = bilevel.make_solver("bo-rep", hypergradient="linear_sgd", z_lr="auto")
    g = torch.Generator().manual_seed(0)
    state = solver.init(problem, *problem.init(g), g)
    assert set(state.resolved) == {"z_lr"}  # the unused neumann_lr "auto" costs nothing
    assert solver.with_resolved(state).estimator().lr == state.resolved["z_lr"]

"""The unbounded-smoothness papers' central claim, shown on Phi(x) = sum cosh(x_i).

At one shared upper step size, gradient-scaled upper steps (StocBiO, SOBA) blow up from x0 = 6,
while the normalized upper steps of BO-REP, SLIP and AccBO stay bounded and converge.
"""
import pytest
import torch

import bilevel
from bilevel import NonFiniteError, hypergradient
from bilevel.problems.cosh import Cosh

SHARED_UPPER_LR = 0.1
LOWER = {  # lower-level settings, identical in spirit across solvers (step 0.5 on a 1-strongly convex g)
    "stocbio": dict(lower_lr=0.5, neumann_lr=0.5),
    "soba": dict(lower_lr=0.5, z_lr=0.5),
    "bo-rep": dict(lower_lr=0.5, neumann_lr=0.5),
    "slip": dict(lower_lr=0.5, neumann_lr=0.5),
    "accbo": dict(lower_lr=0.5, neumann_lr=0.5),
}


def test_problem_closed_form():
    problem = Cosh(dim=2, x0=1.3, noise=None)
    x, y = problem.init(None)
    exact = hypergradient(problem, x, y, None, None, method="exact")
    torch.testing.assert_close(exact["x"], torch.sinh(x["x"]))
    metrics = problem.evaluate(x, y)
    assert metrics["grad_norm_sq"] == pytest.approx(float((torch.sinh(x["x"]) ** 2).sum()))
    assert metrics["inner_distance"] == 0.0


def test_problem_noise_is_seeded_and_validated():
    problem = Cosh(noise=0.5, n_noise=400)
    a = problem.sample("upper", torch.Generator().manual_seed(3))
    b = problem.sample("upper", torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and problem.n_samples("upper") == 400
    table = problem.tables["upper"]
    # centred, so the finite sum is the noiseless problem, with the requested spread per entry
    torch.testing.assert_close(table.mean(dim=0), torch.zeros(3, dtype=table.dtype), atol=1e-12, rtol=0)
    assert 0.4 < float(table.std()) < 0.6
    x, y = problem.init(None)
    noiseless = Cosh(noise=None)
    full = torch.arange(400)
    torch.testing.assert_close(problem.upper_loss(x, y, full), noiseless.upper_loss(x, y, None))
    assert not torch.equal(problem.upper_loss(x, y, a), noiseless.upper_loss(x, y, None))
    assert not torch.equal(Cosh(noise=0.5, seed=1).tables["upper"], table)
    with pytest.raises(ValueError, match="dim"):
        Cosh(dim=0)
    with pytest.raises(ValueError, match="noise"):
        Cosh(noise=-1.0)


@pytest.mark.parametrize("solver", ["stocbio", "soba"])
def test_gradient_scaled_upper_steps_blow_up(solver):
    with pytest.raises(NonFiniteError):
        bilevel.solve(Cosh(), solver, steps=200, upper_lr=SHARED_UPPER_LR, **LOWER[solver])


@pytest.mark.parametrize("solver", ["bo-rep", "slip", "accbo"])
def test_normalized_upper_steps_stay_bounded_and_converge(solver):
    problem = Cosh()
    result = bilevel.solve(problem, solver, steps=300, eval_every=10, upper_lr=SHARED_UPPER_LR, **LOWER[solver])
    norms = result.metric("x_norm")
    assert max(norms) <= norms[0] * (1 + 1e-9), "the iterates left the initial ball"
    start, end = result.history[0]["grad_norm_sq"], result.final["grad_norm_sq"]
    assert end < 1e-3 * start, f"{solver}: {start:.3e} -> {end:.3e}"

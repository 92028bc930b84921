"""Solvers: their first two steps against the papers' equations computed by hand, oracle counts
per step, and convergence on the benchopt quadratic.

The hand-computed problem is deterministic (batch None), so every step is exactly predictable:

    g(x, y) = 1/2 y^T A y + x^T C y + a^T y     grad_y g = A y + C^T x + a,  d2_yy g = A,  d2_xy g = C
    f(x, y) = 1/2 ||y - t||^2 + 1/2 x^T B x     grad_y f = y - t,            grad_x f = B x
"""
import pytest
import torch

import bilevel
from bilevel import count_calls
from bilevel.problems.quadratic import Quadratic
from matrix_problem import DIM_X, DIM_Y, grad_y_g, run_steps
from quadratic_convergence import assert_reduces_hypergradient_norm

def test_stocbio_matches_equations(problem, mats):
    m, lr_y, lr_x, K, Q, eta = mats, 0.3, 0.2, 3, 4, 0.5
    states = run_steps(problem, "stocbio", 2, upper_lr=lr_x, lower_lr=lr_y, inner_steps=K, neumann_steps=Q,
                       neumann_lr=eta)
    x, y = m["x0"].clone(), m["y0"].clone()
    I = torch.eye(DIM_Y, dtype=torch.float64)
    for state in states[1:]:
        for _ in range(K):
            y = y - lr_y * grad_y_g(m, x, y)
        # Q products, Q + 1 terms (StocBiO's Algorithm 2, benchopt's shia)
        v = eta * sum(torch.linalg.matrix_power(I - eta * m["A"], q) @ (y - m["t"]) for q in range(Q + 1))
        x = x - lr_x * (m["B"] @ x - m["C"] @ v)
        torch.testing.assert_close(state.y["y"], y, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.x["x"], x, rtol=0, atol=1e-12)


def test_soba_matches_equations(problem, mats):
    m, lr_y, lr_z, lr_x = mats, 0.3, 0.4, 0.2
    states = run_steps(problem, "soba", 2, upper_lr=lr_x, lower_lr=lr_y, z_lr=lr_z)
    x, y, z = m["x0"].clone(), m["y0"].clone(), torch.zeros(DIM_Y, dtype=torch.float64)
    for state in states[1:]:
        # simultaneous: every direction at the current (x, y, z)
        x, y, z = (x - lr_x * (m["B"] @ x - m["C"] @ z),
                   y - lr_y * grad_y_g(m, x, y),
                   z - lr_z * (m["A"] @ z - (y - m["t"])))
        torch.testing.assert_close(state.x["x"], x, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.y["y"], y, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.core.z["y"], z, rtol=0, atol=1e-12)


def test_aid_cg_matches_equations_with_warm_started_v(problem, mats):
    """One CG step per iteration from the previous v: r = b - A v, v <- v + (r.r / r.A r) r."""
    m, lr_y, lr_x, K = mats, 0.3, 0.2, 2
    states = run_steps(problem, "aid-cg", 2, upper_lr=lr_x, lower_lr=lr_y, inner_steps=K, cg_steps=1)
    x, y, v = m["x0"].clone(), m["y0"].clone(), torch.zeros(DIM_Y, dtype=torch.float64)
    for state in states[1:]:
        for _ in range(K):
            y = y - lr_y * grad_y_g(m, x, y)
        r = (y - m["t"]) - m["A"] @ v
        v = v + (r @ r) / (r @ m["A"] @ r) * r
        x = x - lr_x * (m["B"] @ x - m["C"] @ v)
        torch.testing.assert_close(state.core.estimator["y"], v, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.x["x"], x, rtol=0, atol=1e-12)


def test_itd_bio_matches_unrolled_jacobian(problem, mats):
    """dy_{k+1}/dx = (I - lr A) dy_k/dx - lr C^T;  h = B x + (dy_K/dx)^T (y_K - t)."""
    m, lr_y, lr_x, K = mats, 0.3, 0.2, 3
    states = run_steps(problem, "itd-bio", 2, upper_lr=lr_x, lower_lr=lr_y, inner_steps=K)
    I = torch.eye(DIM_Y, dtype=torch.float64)
    x, y = m["x0"].clone(), m["y0"].clone()
    for state in states[1:]:
        jac = torch.zeros(DIM_Y, DIM_X, dtype=torch.float64)
        for _ in range(K):
            jac = (I - lr_y * m["A"]) @ jac - lr_y * m["C"].T
            y = y - lr_y * grad_y_g(m, x, y)
        x = x - lr_x * (m["B"] @ x + jac.T @ (y - m["t"]))
        torch.testing.assert_close(state.y["y"], y, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.x["x"], x, rtol=0, atol=1e-12)


def test_lower_only_keeps_x_and_trains_y(problem, mats):
    m = mats
    states = run_steps(problem, "lower-only", 2, lower_lr=0.3, inner_steps=2)
    y = m["y0"].clone()
    for state in states[1:]:
        for _ in range(2):
            y = y - 0.3 * grad_y_g(m, m["x0"], y)
        torch.testing.assert_close(state.y["y"], y, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.x["x"], m["x0"], rtol=0, atol=0)


@pytest.mark.parametrize("solver, hp, expected", [
    ("stocbio", dict(inner_steps=3, neumann_steps=4), dict(grad_lower=3, hvp=4, cross=1, grad_upper=1)),
    ("soba", dict(), dict(grad_lower=1, hvp=1, cross=1, grad_upper=1)),
    ("aid-cg", dict(inner_steps=2, cg_steps=3), dict(grad_lower=2, hvp=3 + 1, cross=1, grad_upper=1)),
    ("itd-bio", dict(inner_steps=3), dict(grad_lower=3, hvp=3, cross=3, grad_upper=1)),
    ("itd-bio", dict(inner_steps=3, truncate=1), dict(grad_lower=3, hvp=1, cross=1, grad_upper=1)),
    ("lower-only", dict(inner_steps=2), dict(grad_lower=2, hvp=0, cross=0, grad_upper=0)),
])
def test_oracle_calls_per_step_match_stated_cost(solver, hp, expected):
    """Second step (warm starts in place) on a stochastic quadratic, where CG never converges early."""
    problem = Quadratic(n_samples_inner=64, n_samples_outer=64, dim_inner=6, dim_outer=3, batch_size=8)
    solver_obj = bilevel.make_solver(solver, **hp)
    g = torch.Generator().manual_seed(0)
    state = solver_obj.init(problem, *problem.init(g), g)
    state = solver_obj.step(problem, state)
    with count_calls() as counts:
        solver_obj.step(problem, state)
    assert dict(counts) == expected


# Step budgets and hyperparameters under which each solver must reduce ||grad h(x)||^2 >= 100x.
CONVERGENCE = {
    "soba": dict(upper_lr=0.3, lower_lr=0.3, z_lr=0.3),
    "stocbio": dict(upper_lr=0.3, lower_lr=0.5, inner_steps=10, neumann_steps=20, neumann_lr=0.5),
    # 10 inner steps: with 5 the stochastic run's reduction depends on the random stream (62x to
    # 530x over seeds 0-7 once the Draw stopped drawing an unused seed; 280x-440x with 10)
    "aid-cg": dict(upper_lr=0.3, lower_lr=0.3, inner_steps=10, cg_steps=5),
    "itd-bio": dict(upper_lr=0.3, lower_lr=0.3, inner_steps=30),
}


@pytest.mark.parametrize("batch_size, steps", [(None, 300), (128, 400)], ids=["full-batch", "stochastic"])
@pytest.mark.parametrize("solver", sorted(CONVERGENCE))
def test_solvers_reduce_hypergradient_norm_on_quadratic(solver, batch_size, steps):
    assert_reduces_hypergradient_norm(solver, batch_size, steps, CONVERGENCE[solver])


def test_lower_only_does_not_reduce_hypergradient_norm():
    """The baseline never moves x: a control showing the convergence test can fail."""
    problem = Quadratic(n_samples_inner=256, n_samples_outer=256, dim_inner=10, dim_outer=5, batch_size=None)
    result = bilevel.solve(problem, "lower-only", steps=100, eval_every=100, lower_lr=0.5)
    assert result.final["grad_norm_sq"] == pytest.approx(result.history[0]["grad_norm_sq"])
    assert result.final["inner_distance"] < 1e-3 * result.history[0]["inner_distance"]


def test_composed_solver_warm_start_and_single_loop_order(problem, mats):
    """warm_steps SGD steps at x0 in init; with update_lower_first=False the hypergradient is
    taken at y_t and y then steps from y_t at x_t (SLIP's simultaneous order)."""
    from dataclasses import dataclass

    from bilevel import lower, upper
    from bilevel.estimators import ConjugateGradient
    from bilevel.solver import ComposedSolver

    @dataclass
    class WarmSingleLoop(ComposedSolver):
        update_lower_first = False
        warm_steps: int = 3

        def lower_loop(self):
            return lower.SGD(0.3, steps=1)

        def estimator(self):
            return ConjugateGradient(steps=DIM_Y, warm_start=False)

        def upper_update(self):
            return upper.sgd(0.2)

    m, g = mats, torch.Generator().manual_seed(0)
    solver = WarmSingleLoop()
    state = solver.init(problem, *problem.init(g), g)
    x, y = m["x0"].clone(), m["y0"].clone()
    for _ in range(3):
        y = y - 0.3 * grad_y_g(m, x, y)
    torch.testing.assert_close(state.y["y"], y, rtol=0, atol=1e-12)
    for _ in range(2):
        state = solver.step(problem, state)
        v = torch.linalg.solve(m["A"], y - m["t"])
        x, y = x - 0.2 * (m["B"] @ x - m["C"] @ v), y - 0.3 * grad_y_g(m, x, y)
        torch.testing.assert_close(state.x["x"], x, rtol=0, atol=1e-10)
        torch.testing.assert_close(state.y["y"], y, rtol=0, atol=1e-12)


def test_family_options_are_fields_only_where_used():
    """warm_steps, share_lower_batch (ComposedSolver) and z_radius (the SOBA loop) are class
    attributes with neutral defaults on the bases: a solver lists them as hyperparameters only
    when it declares and uses them (BO-REP, SLIP, AdamBO, AccBO warm-start; MA-SOBA projects z,
    AmIGO, BO-REP and SLIP project linear-system SGD's z)."""
    from bilevel.solvers._normalized_momentum import NormalizedMomentumSolver
    from bilevel.solvers._single_loop import SingleLoopSolver

    fields = {name: set(bilevel.SOLVERS.options(name))
              for name in ("bo-rep", "slip", "adambo", "accbo", "stocbio", "aid-cg", "amigo", "soba", "ma-soba")}
    assert all(set(bilevel.make_solver(n).hyperparameters()) == f for n, f in fields.items())
    assert {n for n, f in fields.items() if "warm_steps" in f} == {"bo-rep", "slip", "adambo", "accbo"}
    # z_radius: MA-SOBA's z projection; AmIGO's and BO-REP/SLIP's linear-system SGD radius
    assert {n for n, f in fields.items() if "z_radius" in f} == {"ma-soba", "amigo", "bo-rep", "slip"}
    assert all("share_lower_batch" in fields[n] for n in ("bo-rep", "stocbio", "aid-cg", "amigo"))
    assert "share_lower_batch" not in fields["soba"]
    assert issubclass(bilevel.SOLVERS.get("bo-rep").cls, NormalizedMomentumSolver)
    assert issubclass(bilevel.SOLVERS.get("soba").cls, SingleLoopSolver)
    assert bilevel.make_solver("soba").z_radius is None and bilevel.make_solver("stocbio").warm_steps == 0

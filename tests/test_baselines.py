"""Baselines TTSA, BSA, AmIGO and MA-SOBA: their first two steps against the papers' equations
computed by hand, oracle counts per step, convergence on the benchopt quadratic, and validation.

The hand-computed problem is deterministic (batch None), so every step is exactly predictable:

    g(x, y) = 1/2 y^T A y + x^T C y + a^T y     grad_y g = A y + C^T x + a,  d2_yy g = A,  d2_xy g = C
    f(x, y) = 1/2 ||y - t||^2 + 1/2 x^T B x     grad_y f = y - t,            grad_x f = B x

Its sample() ignores the run's generator, so the generator's only draws are the randomized
Neumann terms q ~ U{0..Q} (one ``torch.randint(Q + 1, (1,))`` per hypergradient, drawn into the
Draw by bilevel.estimators.Neumann.draw through bilevel.linear_system.draw_neumann_term).
"""
import math

import pytest
import torch

import bilevel
import bilevel.solvers.amigo  # noqa: F401  (registers the solvers)
import bilevel.solvers.bsa  # noqa: F401
import bilevel.solvers.ma_soba  # noqa: F401
import bilevel.solvers.ttsa  # noqa: F401
from bilevel import count_calls
from bilevel.linear_system import draw_neumann_term
from bilevel.problems.quadratic import Quadratic
from matrix_problem import DIM_X, DIM_Y, grad_y_g, run_steps
from quadratic_convergence import assert_reduces_hypergradient_norm

DT = torch.float64


def neumann_terms(n, steps, seed=0):
    """q of the first n Draws of a run seeded ``seed`` whose problem ignores the generator."""
    g = torch.Generator().manual_seed(seed)
    return [int(torch.randint(steps + 1, (1,), generator=g)) for _ in range(n)]


def randomized_neumann(m, b, eta, Q, q):
    """Ghadimi-Wang with Q products at most: v = (Q + 1) eta (I - eta A)^q b, q ~ U{0..Q}."""
    I = torch.eye(DIM_Y, dtype=DT)
    return (Q + 1) * eta * torch.linalg.matrix_power(I - eta * m["A"], q) @ b


def assert_tensor(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# (a) First two steps against the equations.

def test_ttsa_matches_equations(problem, mats):
    """Lower step first with b_t = c/(t+1)^0.4, then v at y_{t+1}, then x with a_t = c/(t+1)^0.6."""
    m, c_y, c_x, e_y, e_x, Q, eta = mats, 0.3, 0.2, 0.4, 0.6, 5, 0.3
    states = run_steps(problem, "ttsa", 2, upper_lr=c_x, lower_lr=c_y, neumann_steps=Q, neumann_lr=eta,
                       lower_lr_decay=e_y, upper_lr_decay=e_x)
    qs = neumann_terms(2, Q)
    assert max(qs) > 0, qs  # the Hessian products take part
    x, y = m["x0"].clone(), m["y0"].clone()
    for t, state in enumerate(states[1:]):
        y = y - c_y / (t + 1) ** e_y * grad_y_g(m, x, y)
        v = randomized_neumann(m, y - m["t"], eta, Q, qs[t])
        x = x - c_x / (t + 1) ** e_x * (m["B"] @ x - m["C"] @ v)
        assert_tensor(state.y["y"], y)
        assert_tensor(state.x["x"], x)


def test_bsa_matches_equations(problem, mats):
    """K warm-started lower steps at b_t = c/(t+1)^0.5, randomized Neumann, x at a_t = c/(t+1)^0.5."""
    m, c_y, c_x, e_y, e_x, K, Q, eta = mats, 0.3, 0.2, 0.5, 0.5, 3, 5, 0.3
    states = run_steps(problem, "bsa", 2, upper_lr=c_x, lower_lr=c_y, inner_steps=K, neumann_steps=Q,
                       neumann_lr=eta, lower_lr_decay=e_y, upper_lr_decay=e_x)
    qs = neumann_terms(2, Q)
    assert max(qs) > 0, qs
    x, y = m["x0"].clone(), m["y0"].clone()
    for t, state in enumerate(states[1:]):
        for _ in range(K):
            y = y - c_y / (t + 1) ** e_y * grad_y_g(m, x, y)
        v = randomized_neumann(m, y - m["t"], eta, Q, qs[t])
        x = x - c_x / (t + 1) ** e_x * (m["B"] @ x - m["C"] @ v)
        assert_tensor(state.y["y"], y)
        assert_tensor(state.x["x"], x)


def test_amigo_matches_equations_with_warm_started_z(problem, mats):
    """K lower steps, then M SGD steps on 1/2 z^T A z - z^T (y - t) from the previous z, then x."""
    m, c_y, c_z, c_x, e_y, e_x, K, M = mats, 0.3, 0.25, 0.2, 0.3, 0.7, 2, 3
    states = run_steps(problem, "amigo", 2, upper_lr=c_x, lower_lr=c_y, z_lr=c_z, inner_steps=K, linear_steps=M,
                       lower_lr_decay=e_y, upper_lr_decay=e_x)
    x, y, z = m["x0"].clone(), m["y0"].clone(), torch.zeros(DIM_Y, dtype=DT)
    for t, state in enumerate(states[1:]):
        for _ in range(K):
            y = y - c_y / (t + 1) ** e_y * grad_y_g(m, x, y)
        for _ in range(M):
            z = z - c_z * (m["A"] @ z - (y - m["t"]))
        x = x - c_x / (t + 1) ** e_x * (m["B"] @ x - m["C"] @ z)
        assert_tensor(state.y["y"], y)
        assert_tensor(state.core.estimator["y"], z)
        assert_tensor(state.x["x"], x)


@pytest.mark.parametrize("radius", [None, 0.3], ids=["no-projection", "projection"])
def test_ma_soba_matches_equations(problem, mats, radius):
    """Simultaneous directions at (x_t, y_t, z_t); m = beta m + (1 - beta) D_x; x <- x - lr m;
    z projected onto the ball of ``radius`` (active on both steps when set)."""
    m, lr_y, lr_z, lr_x, beta = mats, 0.3, 0.4, 0.2, 0.7
    states = run_steps(problem, "ma-soba", 2, upper_lr=lr_x, lower_lr=lr_y, z_lr=lr_z, beta=beta, z_radius=radius)
    x, y, z = m["x0"].clone(), m["y0"].clone(), torch.zeros(DIM_Y, dtype=DT)
    mom = torch.zeros(DIM_X, dtype=DT)
    for state in states[1:]:
        d_x, d_y, d_z = m["B"] @ x - m["C"] @ z, grad_y_g(m, x, y), m["A"] @ z - (y - m["t"])
        mom = beta * mom + (1 - beta) * d_x
        z_new = z - lr_z * d_z
        if radius is not None:
            assert z_new.norm() > radius  # the projection is active
            z_new = z_new * (radius / z_new.norm())
        x, y, z = x - lr_x * mom, y - lr_y * d_y, z_new
        assert_tensor(state.x["x"], x)
        assert_tensor(state.y["y"], y)
        assert_tensor(state.core.z["y"], z)


# ---------------------------------------------------------------------------------------------
# (b) Oracle calls per step.

def small_quadratic():
    return Quadratic(n_samples_inner=64, n_samples_outer=64, dim_inner=6, dim_outer=3, batch_size=8)


@pytest.mark.parametrize("solver, hp, expected", [
    ("amigo", dict(inner_steps=3, linear_steps=4), dict(grad_lower=3, hvp=4, cross=1, grad_upper=1)),
    ("ma-soba", dict(), dict(grad_lower=1, hvp=1, cross=1, grad_upper=1)),
    ("ma-soba", dict(z_radius=0.1), dict(grad_lower=1, hvp=1, cross=1, grad_upper=1)),
])
def test_oracle_calls_per_step_match_stated_cost(solver, hp, expected):
    """Second step (warm starts in place) on a stochastic quadratic."""
    problem = small_quadratic()
    solver_obj = bilevel.make_solver(solver, **hp)
    g = torch.Generator().manual_seed(0)
    state = solver_obj.step(problem, solver_obj.init(problem, *problem.init(g), g))
    with count_calls() as counts:
        solver_obj.step(problem, state)
    assert dict(counts) == expected


@pytest.mark.parametrize("solver, inner_steps", [("ttsa", 1), ("bsa", 3)])
def test_neumann_baselines_call_q_hvps_per_step(solver, inner_steps):
    """inner_steps lower gradients, q HVPs, one cross product, one upper gradient, with q the
    Neumann term of this step's Draw, replayed from a copy of the run generator (lower batches
    first, then q)."""
    Q = 6
    hp = dict(neumann_steps=Q) if solver == "ttsa" else dict(neumann_steps=Q, inner_steps=inner_steps)
    problem = small_quadratic()
    solver_obj = bilevel.make_solver(solver, **hp)
    g = torch.Generator().manual_seed(0)
    state = solver_obj.step(problem, solver_obj.init(problem, *problem.init(g), g))
    qs = []
    for _ in range(4):
        replay = torch.Generator()
        replay.set_state(state.generator.get_state())
        for _ in range(inner_steps):
            problem.sample("lower", replay)
        q = draw_neumann_term(Q, replay)
        with count_calls() as counts:
            state = solver_obj.step(problem, state)
        assert dict(counts) == dict(grad_lower=inner_steps, hvp=q, cross=1, grad_upper=1)
        qs.append(q)
    assert len(set(qs)) > 1, qs  # q varies from step to step


# ---------------------------------------------------------------------------------------------
# (c) Convergence on the benchopt quadratic.

# Step budgets and hyperparameters under which each solver must reduce ||grad h(x)||^2 >= 100x.
CONVERGENCE = {
    "ttsa": (300, dict(upper_lr=1.0, lower_lr=0.5, neumann_lr=0.5, neumann_steps=20)),  # default decays
    "bsa": (300, dict(upper_lr=1.0, lower_lr=0.5, neumann_lr=0.5, neumann_steps=20, inner_steps=5)),
    "amigo": (200, dict(upper_lr=0.3, lower_lr=0.3, z_lr=0.3, inner_steps=5, linear_steps=5)),
    "ma-soba": (300, dict(upper_lr=0.3, lower_lr=0.3, z_lr=0.3)),
}


@pytest.mark.parametrize("batch_size", [None, 128], ids=["full-batch", "stochastic"])
@pytest.mark.parametrize("solver", sorted(CONVERGENCE))
def test_baselines_reduce_hypergradient_norm_on_quadratic(solver, batch_size):
    steps, hp = CONVERGENCE[solver]
    assert_reduces_hypergradient_norm(solver, batch_size, steps, hp)


# ---------------------------------------------------------------------------------------------
# (d) Defaults and hyperparameter validation.

def test_defaults_follow_benchopt():
    """Step 0.1, 10 inner / z steps, benchopt's decay exponents; benchopt's n_hia_steps 10 draws
    q from {0..9}, which is neumann_steps 9 (at most 9 products); neumann_lr is the library's "auto"."""
    ttsa, bsa, amigo, ma_soba = (bilevel.make_solver(n) for n in ("ttsa", "bsa", "amigo", "ma-soba"))
    assert (ttsa.lower_lr, ttsa.upper_lr, ttsa.neumann_lr, ttsa.neumann_steps) == (0.1, 0.1, "auto", 9)
    assert (ttsa.lower_lr_decay, ttsa.upper_lr_decay) == (0.4, 0.6)
    assert (bsa.inner_steps, bsa.neumann_steps, bsa.lower_lr_decay, bsa.upper_lr_decay) == (10, 9, 0.5, 0.5)
    assert (amigo.inner_steps, amigo.linear_steps, amigo.z_lr) == (10, 10, 0.1)
    assert (amigo.lower_lr_decay, amigo.upper_lr_decay) == (0, 0)
    assert (ma_soba.beta, ma_soba.z_radius) == (0.9, None)


@pytest.mark.parametrize("solver, name, value", [
    ("ttsa", "upper_lr", 0.0), ("ttsa", "lower_lr", -0.1), ("ttsa", "neumann_lr", math.nan),
    ("ttsa", "neumann_lr", "Auto"), ("bsa", "neumann_lr", "1/L"),
    ("ttsa", "neumann_steps", -1), ("ttsa", "lower_lr_decay", -0.5), ("ttsa", "upper_lr_decay", math.inf),
    ("bsa", "inner_steps", 0), ("bsa", "neumann_steps", 2.5), ("bsa", "upper_lr_decay", -1.0),
    ("amigo", "z_lr", 0.0), ("amigo", "linear_steps", 0), ("amigo", "inner_steps", -1),
    ("amigo", "lower_lr_decay", math.nan),
    ("ma-soba", "beta", 1.0), ("ma-soba", "beta", -0.1), ("ma-soba", "z_radius", 0.0),
    ("ma-soba", "z_radius", -2.0), ("ma-soba", "z_lr", -1.0),
])
def test_bad_hyperparameters_raise(solver, name, value):
    with pytest.raises(ValueError, match=name):
        bilevel.make_solver(solver, **{name: value})

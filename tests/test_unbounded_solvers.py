"""BO-REP, SLIP and AdamBO (the unbounded-smoothness family): their first steps against the
papers' equations computed by hand, oracle counts per step, convergence on the benchopt
quadratic, and hyperparameter validation.

The hand-computed problem is deterministic (batch None). x has two tensors, u (2) and w (1),
so per-tensor normalization is visible; X = (u, w) is their concatenation:

    g(x, y) = 1/2 y^T A y + X^T C y + a^T y     grad_y g = A y + C^T X + a,  d2_yy g = A,  d2_xy g = C
    f(x, y) = 1/2 ||y - t||^2 + 1/2 X^T B X     grad_y f = y - t,            grad_x f = B X
"""
import pytest
import torch
from omegaconf import OmegaConf

import bilevel
import bilevel.solvers.adambo
import bilevel.solvers.borep
import bilevel.solvers.slip
from bilevel import count_calls
from bilevel.problem import FunctionProblem
from bilevel.problems.quadratic import Quadratic
from bilevel.registry import SOLVERS
from bilevel.upper import polynomial_decay
from matrix_problem import run_steps

DIM_Y, DIM_X = 4, 3
F64 = dict(dtype=torch.float64)


@pytest.fixture(scope="module")
def mats():
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, **F64)  # noqa: E731
    M = r(DIM_Y, DIM_Y)
    return dict(A=M @ M.T / DIM_Y + torch.eye(DIM_Y, **F64), C=0.5 * r(DIM_X, DIM_Y), a=r(DIM_Y),
                t=r(DIM_Y), B=torch.diag(torch.tensor([1.0, 0.5, 0.2], **F64)), x0=r(DIM_X), y0=r(DIM_Y))


def cat(x):
    return torch.cat([x["u"], x["w"]])


@pytest.fixture(scope="module")
def problem(mats):
    m = mats
    return FunctionProblem(
        upper_loss=lambda x, y, b: 0.5 * ((y["y"] - m["t"]) ** 2).sum() + 0.5 * cat(x) @ m["B"] @ cat(x),
        lower_loss=lambda x, y, b: 0.5 * y["y"] @ m["A"] @ y["y"] + cat(x) @ m["C"] @ y["y"] + m["a"] @ y["y"],
        x0={"u": m["x0"][:2], "w": m["x0"][2:]}, y0={"y": m["y0"]})


def sgd(m, x, y, lr, steps):
    for _ in range(steps):
        y = y - lr * (m["A"] @ y + m["C"].T @ x + m["a"])
    return y


def neumann_v(m, y, lr, steps):
    eye = torch.eye(DIM_Y, **F64)
    return lr * sum(torch.linalg.matrix_power(eye - lr * m["A"], q) @ (y - m["t"]) for q in range(steps + 1))


def hypergrad(m, x, y, v):
    return m["B"] @ x - m["C"] @ v


def normalized(m_t, kind):
    if kind == "global":
        return m_t / m_t.norm()
    return torch.cat([m_t[:2] / m_t[:2].norm(), m_t[2:] / m_t[2:].norm()])


def run(problem, name, steps, **hp):
    return run_steps(problem, name, steps, **hp)


def assert_state(state, x, y, atol=1e-12):
    torch.testing.assert_close(cat(state.x), x, rtol=0, atol=atol)
    torch.testing.assert_close(state.y["y"], y, rtol=0, atol=atol)


def step_norms(states, kind):
    """Norm of each x step: one number (global) or one per tensor."""
    out = []
    for a, b in zip(states, states[1:]):
        d = {k: b.x[k] - a.x[k] for k in a.x}
        out.append(torch.cat([d["u"], d["w"]]).norm() if kind == "global" else torch.stack([d["u"].norm(), d["w"].norm()]))
    return out


# ---------------------------------------------------------------------------------------------
# Steps against the equations.

@pytest.mark.parametrize("hypergradient, normalization", [("neumann", "global"), ("linear_sgd", "per_tensor")])
def test_borep_matches_equations(problem, mats, hypergradient, normalization):
    """Warm start at x0, lower loop (N steps) only on t % period == 0, normalized momentum."""
    m = mats
    lr_x, lr_y, beta, period, N, T0, Q, eta, nu = 0.2, 0.3, 0.6, 2, 2, 3, 3, 0.4, 0.3
    states = run(problem, "bo-rep", 3, upper_lr=lr_x, lower_lr=lr_y, beta=beta, period=period, inner_steps=N,
                 warm_steps=T0, neumann_steps=Q, neumann_lr=eta, z_lr=nu, hypergradient=hypergradient,
                 normalization=normalization)
    x, y = m["x0"].clone(), sgd(m, m["x0"], m["y0"], lr_y, T0)
    z, mom = torch.zeros(DIM_Y, **F64), torch.zeros(DIM_X, **F64)
    assert_state(states[0], x, y)
    for t, state in enumerate(states[1:]):
        if t % period == 0:
            y = sgd(m, x, y, lr_y, N)
        if hypergradient == "neumann":
            v = neumann_v(m, y, eta, Q)
        else:
            z = z - nu * (m["A"] @ z - (y - m["t"]))
            v = z
        mom = beta * mom + (1 - beta) * hypergrad(m, x, y, v)
        x = x - lr_x * normalized(mom, normalization)
        assert_state(state, x, y)
    assert not torch.equal(states[1].y["y"], states[0].y["y"])
    assert torch.equal(states[2].y["y"], states[1].y["y"])  # t = 1: no lower step
    for n in step_norms(states, normalization):  # every step (each tensor's) has norm upper_lr
        torch.testing.assert_close(n, torch.full_like(n, lr_x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("hypergradient, normalization", [("neumann", "per_tensor"), ("linear_sgd", "global")])
def test_slip_matches_equations_with_hypergradient_at_y_t(problem, mats, hypergradient, normalization):
    """h_t at (x_t, y_t), then y_{t+1} = y_t - lr grad_y g(x_t, y_t), simultaneous with x."""
    m = mats
    lr_x, lr_y, beta, T0, Q, eta, nu = 0.2, 0.3, 0.6, 2, 3, 0.4, 0.3
    states = run(problem, "slip", 2, upper_lr=lr_x, lower_lr=lr_y, beta=beta, warm_steps=T0, neumann_steps=Q,
                 neumann_lr=eta, z_lr=nu, hypergradient=hypergradient, normalization=normalization)
    x, y = m["x0"].clone(), sgd(m, m["x0"], m["y0"], lr_y, T0)
    z, mom = torch.zeros(DIM_Y, **F64), torch.zeros(DIM_X, **F64)
    assert_state(states[0], x, y)
    for state in states[1:]:
        at = y  # change to sgd(m, x, y, lr_y, 1) (h at y_{t+1}) and this test fails
        if hypergradient == "neumann":
            v = neumann_v(m, at, eta, Q)
        else:
            z = z - nu * (m["A"] @ z - (at - m["t"]))
            v = z
        mom = beta * mom + (1 - beta) * hypergrad(m, x, at, v)
        x, y = x - lr_x * normalized(mom, normalization), sgd(m, x, y, lr_y, 1)
        assert_state(state, x, y)
    for n in step_norms(states, normalization):
        torch.testing.assert_close(n, torch.full_like(n, lr_x), rtol=0, atol=1e-12)


def test_slip_randomized_neumann_reproduces_the_drawn_term(problem, mats):
    """v = (Q + 1) eta (I - eta A)^q grad_y f with q ~ U{0..Q} from the run generator. The
    deterministic problem's sample() leaves the run generator alone, so its only draws are one q
    per step."""
    m = mats
    lr_x, lr_y, beta, Q, eta = 0.2, 0.3, 0.6, 4, 0.4
    states = run(problem, "slip", 3, upper_lr=lr_x, lower_lr=lr_y, beta=beta, warm_steps=1, neumann_steps=Q,
                 neumann_lr=eta, neumann_variant="randomized")
    run_generator = torch.Generator().manual_seed(0)
    eye = torch.eye(DIM_Y, **F64)
    x, y, mom = m["x0"].clone(), sgd(m, m["x0"], m["y0"], lr_y, 1), torch.zeros(DIM_X, **F64)
    terms = []
    for state in states[1:]:
        q = int(torch.randint(Q + 1, (1,), generator=run_generator))
        terms.append(q)
        v = (Q + 1) * eta * torch.linalg.matrix_power(eye - eta * m["A"], q) @ (y - m["t"])
        mom = beta * mom + (1 - beta) * hypergrad(m, x, y, v)
        x, y = x - lr_x * mom / mom.norm(), sgd(m, x, y, lr_y, 1)
        assert_state(state, x, y)
    assert len(set(terms)) > 1, terms  # different terms, so q is really checked


def test_slip_order_is_distinguishable(problem, mats):
    """The hand problem separates h(y_t) from h(y_{t+1}): the first x step differs."""
    m, lr_y = mats, 0.3
    state = run(problem, "slip", 1, upper_lr=0.2, lower_lr=lr_y, beta=0.0, warm_steps=0, neumann_steps=3,
                neumann_lr=0.4)[1]
    x0, y0 = m["x0"], m["y0"]
    at_next = sgd(m, x0, y0, lr_y, 1)
    h_next = hypergrad(m, x0, at_next, neumann_v(m, at_next, 0.4, 3))
    assert (cat(state.x) - (x0 - 0.2 * h_next / h_next.norm())).abs().max() > 1e-3


def test_adambo_matches_bias_corrected_adam(problem, mats):
    """y steps first, h at y_{t+1}; first step moves every coordinate by upper_lr |h|/(|h| + eps)."""
    m = mats
    lr_x, lr_y, b1, b2, T0, Q, eta = 0.05, 0.3, 0.8, 0.9, 2, 2, 0.4  # Q = 2 products, 3 terms
    states = run(problem, "adambo", 2, upper_lr=lr_x, lower_lr=lr_y, beta=b1, beta_sq=b2, warm_steps=T0,
                 neumann_steps=Q, neumann_lr=eta)
    eps = 1e-8
    x, y = m["x0"].clone(), sgd(m, m["x0"], m["y0"], lr_y, T0)
    mom, sq = torch.zeros(DIM_X, **F64), torch.zeros(DIM_X, **F64)
    assert_state(states[0], x, y)
    for k, state in enumerate(states[1:], start=1):
        y = sgd(m, x, y, lr_y, 1)
        h = hypergrad(m, x, y, neumann_v(m, y, eta, Q))
        mom, sq = b1 * mom + (1 - b1) * h, b2 * sq + (1 - b2) * h * h
        x_new = x - lr_x * (mom / (1 - b1 ** k)) / ((sq / (1 - b2 ** k)).sqrt() + eps)
        if k == 1:
            step = (cat(state.x) - x).abs()
            torch.testing.assert_close(step, lr_x * h.abs() / (h.abs() + eps), rtol=0, atol=1e-14)
            torch.testing.assert_close(step, torch.full_like(step, lr_x), rtol=0, atol=1e-8)
        x = x_new
        assert_state(state, x, y)


def test_adambo_coupled_weight_decay_and_eps(problem, mats):
    """weight_decay adds wd x_t to h_t before Adam; adam_eps is the denominator's lambda."""
    m = mats
    lr_x, lr_y, wd, lam = 0.05, 0.3, 0.1, 0.5
    states = run(problem, "adambo", 2, upper_lr=lr_x, lower_lr=lr_y, warm_steps=1, neumann_steps=2, neumann_lr=0.4,
                 weight_decay=wd, adam_eps=lam)
    x, y = m["x0"].clone(), sgd(m, m["x0"], m["y0"], lr_y, 1)
    mom, sq = torch.zeros(DIM_X, **F64), torch.zeros(DIM_X, **F64)
    for k, state in enumerate(states[1:], start=1):
        y = sgd(m, x, y, lr_y, 1)
        h = hypergrad(m, x, y, neumann_v(m, y, 0.4, 2)) + wd * x
        mom, sq = 0.9 * mom + 0.1 * h, 0.999 * sq + 0.001 * h * h
        x = x - lr_x * (mom / (1 - 0.9 ** k)) / ((sq / (1 - 0.999 ** k)).sqrt() + lam)
        assert_state(state, x, y)


# ---------------------------------------------------------------------------------------------
# Oracle counts.

def stochastic_quadratic():
    return Quadratic(n_samples_inner=64, n_samples_outer=64, dim_inner=6, dim_outer=3, batch_size=8)


def counted_run(name, steps, **hp):
    """Oracle counts of init and of each of ``steps`` steps."""
    problem, solver = stochastic_quadratic(), bilevel.make_solver(name, **hp)
    g = torch.Generator().manual_seed(0)
    x0, y0 = problem.init(g)
    with count_calls() as init_counts:
        state = solver.init(problem, x0, y0, g)
    per_step = []
    for _ in range(steps):
        with count_calls() as counts:
            state = solver.step(problem, state)
        per_step.append(dict(counts))
    return dict(init_counts), per_step


@pytest.mark.parametrize("hypergradient, hvps, init_hvps", [("neumann", 4, 20), ("linear_sgd", 1, 0)])
def test_borep_lower_loop_runs_only_every_period(hypergradient, hvps, init_hvps):
    """neumann_steps = 4 HVPs per hypergradient; the default neumann_lr "auto" costs 20 HVPs at
    init (power iteration), linear_sgd with its numeric z_lr none."""
    N, T0 = 3, 5
    init, steps = counted_run("bo-rep", 4, period=2, inner_steps=N, warm_steps=T0, neumann_steps=4,
                              hypergradient=hypergradient)
    assert init == dict(grad_lower=T0, hvp=init_hvps, cross=0, grad_upper=0)
    assert [s["grad_lower"] for s in steps] == [N, 0, N, 0]
    assert steps[1] == dict(grad_lower=0, hvp=hvps, cross=1, grad_upper=1)
    _, steps = counted_run("bo-rep", 3, period=3, inner_steps=N, neumann_steps=4)
    assert [s["grad_lower"] for s in steps] == [N, 0, 0]


@pytest.mark.parametrize("name, hp, expected", [
    ("slip", dict(neumann_steps=4, neumann_lr=0.5), dict(grad_lower=1, hvp=4, cross=1, grad_upper=1)),
    ("slip", dict(hypergradient="linear_sgd"), dict(grad_lower=1, hvp=1, cross=1, grad_upper=1)),
    ("adambo", dict(neumann_steps=4, neumann_lr=0.5), dict(grad_lower=1, hvp=4, cross=1, grad_upper=1)),
])
def test_single_loop_oracle_calls_per_step(name, hp, expected):
    init, steps = counted_run(name, 2, warm_steps=2, **hp)
    assert init == dict(grad_lower=2, hvp=0, cross=0, grad_upper=0)
    assert steps[1] == expected


# ---------------------------------------------------------------------------------------------
# Convergence on the benchopt quadratic.

# A normalized step has length upper_lr whatever the gradient, so a constant one stalls at a
# distance of order upper_lr from the solution; a decaying upper_lr_t = 0.2 / sqrt(t + 1) does not.
# neumann_lr 1 = 1/L_g: with the default 0.1 the 10-term series is biased (mu_g = 0.1) and the
# reduction stalls near 100x.
CONVERGENCE = dict(upper_lr=polynomial_decay(0.2, 0.5), lower_lr=0.3, neumann_steps=10, neumann_lr=1.0)
SOLVER_OPTIONS = {"bo-rep": dict(period=2, inner_steps=3), "slip": {}, "adambo": {}}


@pytest.mark.parametrize("batch_size, steps", [(None, 300), (128, 400)], ids=["full-batch", "stochastic"])
@pytest.mark.parametrize("name", sorted(SOLVER_OPTIONS))
def test_reduces_hypergradient_norm_on_quadratic(name, batch_size, steps):
    problem = Quadratic(n_samples_inner=256, n_samples_outer=256, dim_inner=10, dim_outer=5, batch_size=batch_size)
    result = bilevel.solve(problem, name, steps=steps, seed=0, eval_every=steps, **CONVERGENCE, **SOLVER_OPTIONS[name])
    start, end = result.history[0]["grad_norm_sq"], result.final["grad_norm_sq"]
    assert end < start / 100, f"{name}: {start:.3e} -> {end:.3e}"


# ---------------------------------------------------------------------------------------------
# Registration, configs and validation.

def test_registered_with_papers_and_config_schemas():
    for name in ("bo-rep", "slip", "adambo"):
        entry = SOLVERS.get(name)
        assert entry.paper and entry.description
        OmegaConf.structured(entry.cls)  # options are typed for `bilevel run` configs
    assert SOLVERS.get("slip").cls.update_lower_first is False
    assert SOLVERS.get("adambo").cls.update_lower_first is True


@pytest.mark.parametrize("name, hp, field", [
    ("bo-rep", dict(beta=1.0), "beta"),
    ("bo-rep", dict(beta=-0.1), "beta"),
    ("bo-rep", dict(period=0), "period"),
    ("bo-rep", dict(inner_steps=0), "inner_steps"),
    ("bo-rep", dict(neumann_steps=-1), "neumann_steps"),
    ("bo-rep", dict(warm_steps=-1), "warm_steps"),
    ("bo-rep", dict(hypergradient="cg"), "hypergradient"),
    ("bo-rep", dict(normalization="layer"), "normalization"),
    ("bo-rep", dict(neumann_variant="N4"), "neumann_variant"),
    ("bo-rep", dict(upper_lr=0.0), "upper_lr"),
    ("slip", dict(beta=float("nan")), "beta"),
    ("slip", dict(normalization="none"), "normalization"),
    ("slip", dict(hypergradient="exact"), "hypergradient"),
    ("slip", dict(neumann_steps=1.5), "neumann_steps"),
    ("slip", dict(z_lr=-1.0), "z_lr"),
    ("adambo", dict(beta=1.0), "beta"),
    ("adambo", dict(beta_sq=1.0), "beta_sq"),
    ("adambo", dict(adam_eps=-1e-8), "adam_eps"),
    ("adambo", dict(weight_decay=-0.01), "weight_decay"),
    ("adambo", dict(lower_lr=0.0), "lower_lr"),
    ("adambo", dict(warm_steps=-2), "warm_steps"),
])
def test_bad_hyperparameters_raise_naming_them(name, hp, field):
    with pytest.raises(ValueError, match=field):
        bilevel.make_solver(name, **hp)

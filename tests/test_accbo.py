"""AccBO (solvers/accbo.py): steps by hand from the paper's equations, oracle counts, convergence.

The hand-computed problem is deterministic (batch None), so the run generator is touched only by
the estimator's draw: the randomized Neumann term q ~ U{0..Q} of step t (one ``torch.randint(Q + 1)``
per Draw), reproduced here from a generator with the run's seed:

    g(x, y) = 1/2 y^T A y + x^T C y + a^T y     grad_y g = A y + C^T x + a,  d2_yy g = A,  d2_xy g = C
    f(x, y) = 1/2 ||y - t||^2 + 1/2 x^T B x     grad_y f = y - t,            grad_x f = B x
"""
import pytest
import torch

import bilevel
import bilevel.solvers.accbo  # noqa: F401  (registers "accbo")
from bilevel import count_calls, linear_system
from bilevel.problems.quadratic import Quadratic
from bilevel.sampling import run_generator
from matrix_problem import DIM_Y, run_steps

DT = torch.float64
SEED = 6  # its draws give Neumann terms q = 2, 1, 3 with Q = 3: distinct, so lazy and paper STORM differ


def run(problem, n, **hp):
    return bilevel.make_solver("accbo", **hp), run_steps(problem, "accbo", n, seed=SEED, **hp)


def by_hand(m, n, *, upper_lr, lower_lr, momentum, averaging, beta, Q, eta, warm_steps, period=1, inner_steps=1,
            lazy=False):
    """The paper's recursion with dense matrices; returns [(x_t, y_t, yhat_t)] for t = 0..n and the q's."""
    I = torch.eye(DIM_Y, dtype=DT)

    def grad_g(x, y):
        return m["A"] @ y + m["C"].T @ x + m["a"]

    def snag(x, y, y_prev):
        w = y + momentum * (y - y_prev)
        return w - lower_lr * grad_g(x, w), y

    def hypergrad(x, y_hat, q):  # Ghadimi-Wang: v = (Q + 1) eta (I - eta A)^q (y - t)
        v = (Q + 1) * eta * torch.linalg.matrix_power(I - eta * m["A"], q) @ (y_hat - m["t"])
        return m["B"] @ x - m["C"] @ v

    x, y, y_prev = m["x0"].clone(), m["y0"].clone(), m["y0"].clone()
    for _ in range(warm_steps):
        y, y_prev = snag(x, y, y_prev)
    y_prev, y_hat = y.clone(), y.clone()  # y_{-1} = yhat_0 = y_0
    gen = torch.Generator().manual_seed(SEED)
    out, qs, prev = [(x, y, y_hat)], [], None
    for t in range(n):
        if t % period == 0:
            for _ in range(inner_steps):
                y, y_prev = snag(x, y, y_prev)
        y_hat = (1 - averaging) * y_hat + averaging * y  # once per outer iteration, skipped ones too
        q = int(torch.randint(Q + 1, (1,), generator=gen))
        qs.append(q)
        h = hypergrad(x, y_hat, q)
        if prev is None:
            mom = h                                                  # m_0 = h_0
        else:
            x_old, y_hat_old, h_old = prev
            h_prime = h_old if lazy else hypergrad(x_old, y_hat_old, q)   # same q: same sample
            mom = beta * mom + (1 - beta) * h + beta * (h - h_prime)
        prev = (x, y_hat, h)
        x = x - upper_lr * mom / mom.norm()
        out.append((x, y, y_hat))
    return out, qs


HP = dict(upper_lr=0.2, lower_lr=0.3, momentum=0.4, averaging=0.6, beta=0.7, neumann_steps=3, neumann_lr=0.5,
          warm_steps=2)


def hand_hp(hp):
    return dict(upper_lr=hp["upper_lr"], lower_lr=hp["lower_lr"], momentum=hp["momentum"],
                averaging=hp["averaging"], beta=hp["beta"], Q=hp["neumann_steps"], eta=hp["neumann_lr"],
                warm_steps=hp["warm_steps"], period=hp.get("period", 1), inner_steps=hp.get("inner_steps", 1),
                lazy=hp.get("lazy_storm", False))


def check(states, expected, solver):
    for state, (x, y, y_hat) in zip(states, expected):
        torch.testing.assert_close(state.x["x"], x, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.core.lower.y["y"], y, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.core.lower.y_avg["y"], y_hat, rtol=0, atol=1e-12)
        px, py = solver.point(state)  # the evaluated iterate is (x_t, yhat_t)
        torch.testing.assert_close(px["x"], x, rtol=0, atol=1e-12)
        torch.testing.assert_close(py["y"], y_hat, rtol=0, atol=1e-12)


def test_two_steps_match_paper_equations(problem, mats):
    """Warm SNAG, SNAG + averaging, randomized Neumann at yhat, m_0 = h_0, then the same-sample
    STORM correction at (x_0, yhat_1) and global normalization."""
    solver, states = run(problem, 2, **HP)
    expected, qs = by_hand(mats, 2, **hand_hp(HP))
    assert qs[0] != qs[1] and min(qs) > 0, qs  # the premise that makes the correction visible
    check(states, expected, solver)


def test_first_step_is_normalized_h0(problem, mats):
    """m_0 = h_0: x_1 = x_0 - upper_lr h_0 / ||h_0||, h_0 at (x_0, yhat_1)."""
    solver, states = run(problem, 1, **HP)
    expected, qs = by_hand(mats, 1, **hand_hp(HP))
    y_hat = expected[1][2]
    I, eta, Q = torch.eye(DIM_Y, dtype=DT), HP["neumann_lr"], HP["neumann_steps"]
    v = (Q + 1) * eta * torch.linalg.matrix_power(I - eta * mats["A"], qs[0]) @ (y_hat - mats["t"])
    h0 = mats["B"] @ mats["x0"] - mats["C"] @ v
    torch.testing.assert_close(states[1].x["x"], mats["x0"] - HP["upper_lr"] * h0 / h0.norm(), rtol=0, atol=1e-12)


def test_lazy_storm_reuses_previous_estimate(problem, mats):
    """The code's variant: h'_1 := h_0 (its own q), which differs from the paper's re-evaluation."""
    hp = dict(HP, lazy_storm=True)
    solver, states = run(problem, 2, **hp)
    expected, _ = by_hand(mats, 2, **hand_hp(hp))
    check(states, expected, solver)
    paper, _ = by_hand(mats, 2, **hand_hp(HP))
    assert (paper[2][0] - expected[2][0]).abs().max() > 1e-4


@pytest.mark.parametrize("period, inner_steps", [(1, 1), (2, 1), (1, 3), (2, 3)])
def test_period_and_inner_steps_average_once_per_outer_iteration(problem, mats, period, inner_steps):
    """inner_steps SNAG steps on t % period == 0, none otherwise; yhat averaged ONCE per outer
    iteration, skipped ones included (AccBO's Algorithm 1 and its official code).
    The old code averaged after every SNAG step and not on skipped iterations: at (2, 3) it was off
    by max |delta yhat| 0.17 within 6 steps."""
    hp = dict(HP, period=period, inner_steps=inner_steps)
    solver, states = run(problem, 6, **hp)
    expected, _ = by_hand(mats, 6, **hand_hp(hp))
    check(states, expected, solver)
    for t in range(1, 6):
        y_moved = not torch.equal(states[t + 1].core.lower.y["y"], states[t].core.lower.y["y"])
        assert y_moved == (t % period == 0)
        # the average moves on every iteration (y_hat != y here), skipped ones included
        assert not torch.equal(states[t + 1].core.lower.y_avg["y"], states[t].core.lower.y_avg["y"])


def stochastic_problem():
    return Quadratic(n_samples_inner=64, n_samples_outer=64, dim_inner=6, dim_outer=3, batch_size=8)


@pytest.mark.parametrize("lazy, expected", [
    (False, dict(grad_lower=2, hvp=2 * 4, cross=2, grad_upper=2)),
    (True, dict(grad_lower=2, hvp=4, cross=1, grad_upper=1)),
], ids=["paper", "lazy_storm"])
def test_oracle_calls_per_step(lazy, expected):
    """Second step, textbook Neumann sum (Q = 4 HVPs per hypergradient), inner_steps = 2."""
    problem, g = stochastic_problem(), torch.Generator().manual_seed(0)
    solver = bilevel.make_solver("accbo", inner_steps=2, neumann_steps=4, neumann_variant="sum", lazy_storm=lazy,
                                 neumann_lr=0.5)
    state = solver.init(problem, *problem.init(g), g)
    with count_calls() as first:
        state = solver.step(problem, state)
    assert dict(first) == dict(grad_lower=2, hvp=4, cross=1, grad_upper=1)  # m_0 = h_0: one hypergradient
    with count_calls() as counts:
        solver.step(problem, state)
    assert dict(counts) == expected


def test_randomized_neumann_evaluates_one_q_twice(monkeypatch):
    """With the randomized term both hypergradients of a step use the same q, costing q HVPs each."""
    drawn = []
    original = linear_system.draw_neumann_term

    def recording(steps, generator, variant="randomized"):
        drawn.append(original(steps, generator, variant))
        return drawn[-1]
    monkeypatch.setattr(linear_system, "draw_neumann_term", recording)
    problem, g = stochastic_problem(), torch.Generator().manual_seed(0)
    solver = bilevel.make_solver("accbo", neumann_steps=5, period=2, neumann_lr=0.5)
    state = solver.init(problem, *problem.init(g), g)
    for _ in range(4):
        drawn.clear()
        with count_calls() as counts:
            state = solver.step(problem, state)
        assert len(drawn) == 1  # one q per step, evaluated at both points
        evaluations = 1 if state.iteration == 1 else 2
        expected_lower = 1 if (state.iteration - 1) % 2 == 0 else 0
        assert dict(counts) == dict(grad_lower=expected_lower, hvp=evaluations * drawn[0], cross=evaluations,
                                    grad_upper=evaluations)


@pytest.mark.parametrize("share", [False, True])
def test_hessian_and_cross_batches(monkeypatch, share):
    """Independent Hessian and cross batches by default (the code draws two train batches); one
    fresh batch per Hessian product; share_lower_batch: the cross product on the first of them."""
    problem, g = stochastic_problem(), run_generator(0)  # blocks of one epoch: two draws differ
    solver = bilevel.make_solver("accbo", share_lower_batch=share, neumann_steps=5)
    state = solver.init(problem, *problem.init(g), g)
    sample = solver.with_resolved(state).sample(problem, 0, g).draw
    assert sample.term > 0 and len(sample.hessian) == sample.term  # the premise: at least one product
    assert torch.equal(sample.hessian[0], sample.cross) == share


@pytest.mark.parametrize("lazy", [False, True], ids=["paper", "lazy_storm"])
@pytest.mark.parametrize("batch_size", [None, 128], ids=["full-batch", "stochastic"])
def test_reduces_hypergradient_norm_on_quadratic(batch_size, lazy):
    """Constant normalized steps: ||grad h||^2 falls >= 100x in 300 steps (about 300-1500x)."""
    problem = Quadratic(n_samples_inner=256, n_samples_outer=256, dim_inner=10, dim_outer=5, batch_size=batch_size)
    result = bilevel.solve(problem, "accbo", steps=300, seed=0, eval_every=300, upper_lr=0.02, lower_lr=0.5,
                           neumann_steps=20, neumann_lr=1.0, lazy_storm=lazy)
    start, end = result.history[0]["grad_norm_sq"], result.final["grad_norm_sq"]
    assert end < start / 100, f"{start:.3e} -> {end:.3e}"


@pytest.mark.parametrize("option, value", [
    ("upper_lr", 0.0), ("lower_lr", -1.0), ("neumann_lr", 0.0), ("momentum", 1.0), ("momentum", -0.1),
    ("averaging", 0.0), ("averaging", 1.5), ("beta", 1.0), ("beta", -0.5), ("neumann_steps", -1),
    ("warm_steps", -1), ("period", 0), ("inner_steps", 0), ("normalization", "layer"),
    ("neumann_variant", "N1"), ("neumann_lr", "fast"),
])
def test_invalid_hyperparameters_raise(option, value):
    with pytest.raises(ValueError, match=option):
        bilevel.make_solver("accbo", **{option: value})


def test_defaults_and_schedules():
    """Defaults of the official code's AUC experiment (AccBO repository, auc_maximization/);
    step sizes may be schedules."""
    solver = bilevel.make_solver("accbo")
    assert (solver.upper_lr, solver.lower_lr, solver.momentum, solver.averaging, solver.beta, solver.neumann_steps,
            solver.neumann_lr, solver.warm_steps, solver.period, solver.inner_steps) == \
        (5e-3, 5e-3, 0.5, 0.5, 0.9, 3, "auto", 3, 1, 1)  # neumann_lr: the library's 1/L (code: 0.1)
    assert (solver.normalization, solver.neumann_variant, solver.lazy_storm) == ("global", "randomized", False)
    bilevel.make_solver("accbo", upper_lr=bilevel.upper.polynomial_decay(0.1, 0.5))

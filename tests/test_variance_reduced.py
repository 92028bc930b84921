"""SUSTAIN, MRBO and VRBO (recursive-momentum / SPIDER baselines, bilevel.recursive).

Hand computations use a tiny quadratic with dense matrices, scaled per batch:

    g(x, y; b) = s(b) (1/2 y^T A y + x^T C y + a^T y)      s(b) = 1 + 0.1 (b mod 7)
    f(x, y; b) = r(b) 1/2 ||y - t||^2 + 1/2 x^T B x         r(b) = 1 + 0.2 (b mod 5)

either with batch None (s = r = 1) or with "counter" batches 0, 1, 2, ... (one counter over all
sample() calls, never touching the run's generator). A recursive sample takes its batches in
the order: lower batch of grad_y g, (the randomized term q ~ U{0..Q}, from the run generator),
upper batch, one Hessian batch per product (Q for the sum, q for the randomized term), cross
batch. With counter batches a correction G(new; B) - G(old; B) is non-trivial, so the hand
computation checks that both points use the same batches and the STORM / SPIDER weights.
"""
import copy
import math

import pytest
import torch

import bilevel
import bilevel.solvers.mrbo  # noqa: F401  (registers "mrbo")
import bilevel.solvers.sustain  # noqa: F401  (registers "sustain")
import bilevel.solvers.vrbo  # noqa: F401  (registers "vrbo")
from bilevel import count_calls
from bilevel.estimators import Neumann
from bilevel.problem import BilevelProblem, FunctionProblem
from bilevel.problems.quadratic import Quadratic
from bilevel.recursive import evaluate, refresh, sample
from quadratic_convergence import assert_reduces_hypergradient_norm

DT = torch.float64
DIM_Y, DIM_X = 4, 3


@pytest.fixture(scope="module")
def m():
    gen = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731
    M = r(DIM_Y, DIM_Y)
    return dict(A=0.5 * M @ M.T / DIM_Y + 0.5 * torch.eye(DIM_Y, dtype=DT), C=0.4 * r(DIM_X, DIM_Y), a=r(DIM_Y),
                t=r(DIM_Y), B=torch.diag(torch.tensor([0.8, 0.5, 0.3], dtype=DT)), x0=r(DIM_X), y0=r(DIM_Y))


def lower_scale(b):
    return 1.0 if b is None else 1.0 + 0.1 * (b % 7)


def upper_scale(b):
    return 1.0 if b is None else 1.0 + 0.2 * (b % 5)


def make_problem(m, counter):
    state = {"next": 0}

    def counter_sample(level, generator):
        state["next"] += 1
        return state["next"] - 1

    return FunctionProblem(
        upper_loss=lambda x, y, b: upper_scale(b) * 0.5 * ((y["y"] - m["t"]) ** 2).sum() + 0.5 * x["x"] @ m["B"] @ x["x"],
        lower_loss=lambda x, y, b: lower_scale(b) * (0.5 * y["y"] @ m["A"] @ y["y"] + x["x"] @ m["C"] @ y["y"]
                                                     + m["a"] @ y["y"]),
        x0={"x": m["x0"]}, y0={"y": m["y0"]}, sample=counter_sample if counter else None)


class HandG:
    """G(x, y; sample j) = (grad_y g, Neumann hypergradient), by dense algebra."""

    def __init__(self, m, counter, variant, Q):
        self.m, self.counter, self.variant, self.Q = m, counter, variant, Q
        self.run = torch.Generator().manual_seed(0)  # the run generator: only the randomized term consumes it
        self.next, self.samples, self.terms = 0, [], []

    def take(self):
        self.next += 1
        return self.next - 1 if self.counter else None

    def sample(self, j):
        """(lower, upper, [Hessian batch per product], cross, q) of sample j, drawn in order."""
        while len(self.samples) <= j:
            lower = self.take()
            q = int(torch.randint(self.Q + 1, (1,), generator=self.run)) if self.variant == "randomized" else None
            upper = self.take()
            hessian = [self.take() for _ in range(self.Q if q is None else q)]
            self.samples.append((lower, upper, hessian, self.take(), q))
            self.terms += [] if q is None else [q]
        return self.samples[j]

    def __call__(self, x, y, j, lr):
        m, (bl, bu, bh, bc, _) = self.m, self.sample(j)
        gy = lower_scale(bl) * (m["A"] @ y + m["C"].T @ x + m["a"])
        u = upper_scale(bu) * (y - m["t"])
        total = u
        for b in bh:  # the k-th product on the k-th batch
            u = u - lr * lower_scale(b) * m["A"] @ u
            total = total + u
        v = lr * total if self.variant == "sum" else (self.Q + 1) * lr * u
        return gy, m["B"] @ x - lower_scale(bc) * m["C"] @ v


def decay(c, e, t):
    return c / (t + 1) ** e


def run(problem, name, steps, **hp):
    solver = bilevel.make_solver(name, **hp)
    g = torch.Generator().manual_seed(0)
    states = [solver.init(problem, *problem.init(g), g)]
    for _ in range(steps):
        states.append(solver.step(problem, states[-1]))
    return states


def check(state, x, y, d, tol=1e-12):
    torch.testing.assert_close(state.x["x"], x, rtol=0, atol=tol)
    torch.testing.assert_close(state.y["y"], y, rtol=0, atol=tol)
    torch.testing.assert_close(state.core.d.lower["y"], d[0], rtol=0, atol=tol)
    torch.testing.assert_close(state.core.d.upper["x"], d[1], rtol=0, atol=tol)


# ---------------------------------------------------------------------------------------------
# (a) first steps by hand.

@pytest.mark.parametrize("counter", [False, True], ids=["batch-None", "counter-batches"])
@pytest.mark.parametrize("name, variant", [("sustain", "randomized"), ("mrbo", "sum")])
def test_double_momentum_matches_equations(m, name, variant, counter):
    """x_{t+1}, y_{t+1} from d_t at (x_t, y_t); d_{t+1} = G(p_{t+1}; B) + (1 - eta_{t+1})(d_t - G(p_t; B)),
    with decaying upper_lr, lower_lr, neumann_lr and eta (c / (t + 1)^e)."""
    hp = dict(upper_lr=0.3, lower_lr=0.4, eta=0.6, neumann_lr=0.5, neumann_steps=4, upper_lr_decay=0.5,
              lower_lr_decay=0.25, neumann_lr_decay=0.5, eta_decay=1.0)
    states = run(make_problem(m, counter), name, 3, **hp)
    G = HandG(m, counter, variant, hp["neumann_steps"])
    x, y = m["x0"].clone(), m["y0"].clone()
    d = G(x, y, 0, decay(hp["neumann_lr"], hp["neumann_lr_decay"], 0))
    if name == "mrbo":  # zero_start: d_0 = G + (1 - eta_0)(0 - G) at (x_0, y_0) = eta_0 G
        d = tuple(decay(hp["eta"], hp["eta_decay"], 0) * part for part in d)
    check(states[0], x, y, d)
    for t, state in enumerate(states[1:]):
        x_new = x - decay(hp["upper_lr"], hp["upper_lr_decay"], t) * d[1]
        y_new = y - decay(hp["lower_lr"], hp["lower_lr_decay"], t) * d[0]
        w, lr = 1 - decay(hp["eta"], hp["eta_decay"], t + 1), decay(hp["neumann_lr"], hp["neumann_lr_decay"], t + 1)
        at_new, at_old = G(x_new, y_new, t + 1, lr), G(x, y, t + 1, lr)  # the SAME sample t + 1 at both points
        d = tuple(n + w * (dd - o) for n, dd, o in zip(at_new, d, at_old))
        x, y = x_new, y_new
        check(state, x, y, d)
    if variant == "randomized":  # one q per sample (used at both points), different q across samples
        assert len(set(G.terms)) > 1, G.terms


@pytest.mark.parametrize("counter", [False, True], ids=["batch-None", "counter-batches"])
def test_vrbo_matches_equations(m, counter):
    """Refresh (mean of refresh_batches samples; one evaluation with batch None) every period
    iterations; x moves with u, then SPIDER corrections for the x move and each y move.
    upper_lr is given as a schedule t -> lr_t."""
    hp = dict(upper_lr=lambda t: 0.3 / (t + 1), lower_lr=0.4, neumann_lr=0.5, neumann_steps=4, inner_steps=2, period=2, refresh_batches=3)
    states = run(make_problem(m, counter), "vrbo", 3, **hp)
    G = HandG(m, counter, "sum", hp["neumann_steps"])
    lr, j = hp["neumann_lr"], 0
    x, y = m["x0"].clone(), m["y0"].clone()
    assert all(float(v.abs().max()) == 0 for d in states[0].core.d for v in d.values())  # zeros until the refresh
    for k, state in enumerate(states[1:]):
        if k % hp["period"] == 0:
            n = hp["refresh_batches"] if counter else 1
            values = [G(x, y, j + i, lr) for i in range(n)]
            d, j = tuple(sum(parts) / n for parts in zip(*values)), j + n
        x_new = x - hp["upper_lr"](k) * d[1]
        d = tuple(dd + n - o for dd, n, o in zip(d, G(x_new, y, j, lr), G(x, y, j, lr)))
        j += 1
        for _ in range(hp["inner_steps"]):
            y_new = y - hp["lower_lr"] * d[0]
            d = tuple(dd + n - o for dd, n, o in zip(d, G(x_new, y_new, j, lr), G(x_new, y, j, lr)))
            y, j = y_new, j + 1
        x = x_new
        check(state, x, y, d)


# ---------------------------------------------------------------------------------------------
# The correction evaluates the previous point on the current batch (stochastic problem).

class Recording(BilevelProblem):
    """Wraps a stochastic problem: batches become (id, inner batch) and every loss call records
    (id, point) with point = (x, y) flattened."""

    def __init__(self, inner):
        self.inner, self.calls, self.next_id = inner, [], 0

    def sample(self, level, generator):
        self.next_id += 1
        return self.next_id - 1, self.inner.sample(level, generator)

    def _record(self, x, y, batch):
        self.calls.append((batch[0], torch.cat([x["x"].detach(), y["z"].detach()]).clone()))
        return batch[1]

    def upper_loss(self, x, y, batch):
        return self.inner.upper_loss(x, y, self._record(x, y, batch))

    def lower_loss(self, x, y, batch):
        return self.inner.lower_loss(x, y, self._record(x, y, batch))

    def init(self, generator):
        return self.inner.init(generator)


def points_by_batch(calls):
    """For each batch id (in order of first use), its distinct points."""
    out = {}
    for batch_id, point in calls:
        pts = out.setdefault(batch_id, [])
        if not any(torch.equal(point, p) for p in pts):
            pts.append(point)
    return list(out.values())


@pytest.mark.parametrize("name, hp, corrections", [
    ("sustain", dict(neumann_steps=3), 1),
    ("mrbo", dict(neumann_steps=3), 1),
    ("vrbo", dict(neumann_steps=3, inner_steps=3, period=5, refresh_batches=2), 4),
])
def test_correction_uses_the_current_batch_at_both_points(name, hp, corrections):
    """In a non-refresh step every batch is used at exactly two points, the new and the old one
    of one correction, and the corrections chain from (x_t, y_t) to (x_{t+1}, y_{t+1})."""
    problem = Recording(Quadratic(n_samples_inner=64, n_samples_outer=64, dim_inner=6, dim_outer=3, batch_size=8))
    solver = bilevel.make_solver(name, **hp)
    g = torch.Generator().manual_seed(0)
    state = solver.step(problem, solver.init(problem, *problem.init(g), g))
    problem.calls.clear()
    new_state = solver.step(problem, state)
    groups = points_by_batch(problem.calls)
    assert all(len(pts) == 2 for pts in groups), [len(pts) for pts in groups]
    links = []  # one pair {old, new} per correction (the batches of one sample share it)
    for pts in groups:
        if not (links and all(any(torch.equal(p, q) for q in links[-1]) for p in pts)):
            links.append(pts)
    assert len(links) == corrections
    current = torch.cat([state.x["x"], state.y["z"]])
    for pts in links:  # each correction starts where the previous one ended
        assert any(torch.equal(p, current) for p in pts)
        current = next(p for p in pts if not torch.equal(p, current))
    torch.testing.assert_close(current, torch.cat([new_state.x["x"], new_state.y["z"]]), rtol=0, atol=0)


def test_refresh_averages_independent_samples_and_is_one_call_when_deterministic():
    problem = Quadratic(n_samples_inner=64, n_samples_outer=64, dim_inner=6, dim_outer=3, batch_size=8)
    estimator = Neumann(lr=0.5, steps=3)
    x, y = problem.init(None)
    g = torch.Generator().manual_seed(3)
    twin = copy.deepcopy(g)
    got = refresh(problem, estimator, x, y, g, 4)
    values = [evaluate(problem, estimator, x, y, sample(problem, twin, False, estimator)) for _ in range(4)]
    for k, part in enumerate(got):
        key = next(iter(part))
        expected = sum(v[k][key] for v in values) / 4
        torch.testing.assert_close(part[key], expected, rtol=0, atol=1e-12)
        assert not torch.allclose(values[0][k][key], expected)  # the samples do differ
    full = Quadratic(n_samples_inner=64, n_samples_outer=64, dim_inner=6, dim_outer=3, batch_size=None)
    with count_calls() as counts:
        refresh(full, estimator, x, y, g, 4)
    assert dict(counts) == dict(grad_lower=1, grad_upper=1, hvp=3, cross=1)


# ---------------------------------------------------------------------------------------------
# (b) oracle calls per step.

def stochastic_quadratic(batch_size=8):
    return Quadratic(n_samples_inner=64, n_samples_outer=64, dim_inner=6, dim_outer=3, batch_size=batch_size)


def counts_per_step(problem, name, steps, **hp):
    solver = bilevel.make_solver(name, **hp)
    g = torch.Generator().manual_seed(0)
    with count_calls() as counts:
        state = solver.init(problem, *problem.init(g), g)
    out = [dict(counts)]
    for _ in range(steps):
        with count_calls() as counts:
            state = solver.step(problem, state)
        out.append(dict(counts))
    return out, state


def evaluation(Q, n=1, hvp=None):
    return dict(grad_lower=n, grad_upper=n, hvp=n * Q if hvp is None else hvp, cross=n)


def test_mrbo_oracle_calls_per_step():
    counts, _ = counts_per_step(stochastic_quadratic(), "mrbo", 2, neumann_steps=4, neumann_lr=0.5)
    assert counts == [evaluation(4), evaluation(4, 2), evaluation(4, 2)]
    # "auto": 20 power-iteration HVPs at init, counted
    counts, _ = counts_per_step(stochastic_quadratic(), "mrbo", 1, neumann_steps=4)
    assert counts == [dict(evaluation(4), hvp=4 + 20), evaluation(4, 2)]


def test_sustain_oracle_calls_per_step_follow_the_drawn_neumann_term():
    """Two evaluations per step, each with q HVPs for the step's q (drawn from the run generator
    after the lower batch)."""
    problem, Q = stochastic_quadratic(), 4
    solver = bilevel.make_solver("sustain", neumann_steps=Q)
    g = torch.Generator().manual_seed(0)
    state = solver.step(problem, solver.init(problem, *problem.init(g), g))
    terms = []
    for _ in range(6):
        twin = copy.deepcopy(state.generator)
        problem.sample("lower", twin)
        q = int(torch.randint(Q + 1, (1,), generator=twin))
        with count_calls() as counts:
            state = solver.step(problem, state)
        assert dict(counts) == evaluation(Q, 2, hvp=2 * q)
        terms.append(q)
    assert len(set(terms)) > 1, terms


def test_vrbo_oracle_calls_per_step_and_refresh_period():
    Q, m, R = 4, 2, 5
    counts, _ = counts_per_step(stochastic_quadratic(), "vrbo", 4, neumann_steps=Q, inner_steps=m, period=3,
                                refresh_batches=R, neumann_lr=0.5)
    corrections = evaluation(Q, 2 * (m + 1))
    refreshed = {k: v + R * evaluation(Q)[k] for k, v in corrections.items()}
    assert counts == [evaluation(Q, 0), refreshed, corrections, corrections, refreshed]
    # deterministic problem: the refresh is one full-batch evaluation
    counts, _ = counts_per_step(stochastic_quadratic(None), "vrbo", 1, neumann_steps=Q, inner_steps=m,
                                refresh_batches=R, neumann_lr=0.5)
    assert counts[1] == {k: v + evaluation(Q)[k] for k, v in corrections.items()}


# ---------------------------------------------------------------------------------------------
# The state is everything: a resumed run equals an uninterrupted one.

@pytest.mark.parametrize("name, hp", [("sustain", {}), ("mrbo", dict(neumann_steps=3)),
                                      ("vrbo", dict(neumann_steps=3, inner_steps=1, period=2, refresh_batches=2))])
def test_resumed_run_equals_uninterrupted_run(name, hp):
    problem = stochastic_quadratic()
    whole = bilevel.solve(problem, name, steps=5, seed=1, **hp)
    first = bilevel.solve(problem, name, steps=2, seed=1, **hp)
    rest = bilevel.solve(problem, name, steps=3, state=first.state, **hp)
    torch.testing.assert_close(rest.x, whole.x, rtol=0, atol=0)
    torch.testing.assert_close(rest.y, whole.y, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# (c) convergence on the benchopt quadratic.

# Hyperparameters and step budgets under which ||grad h(x)||^2 must drop >= 100x. Neumann lr 1
# (L_inner = 1) and 15 terms keep the truncation bias below that level; SUSTAIN and MRBO keep
# their default decays.
CONVERGENCE = {
    "sustain": (100, dict(upper_lr=0.5, lower_lr=0.5, neumann_lr=1.0, neumann_steps=15)),
    "mrbo": (100, dict(upper_lr=0.5, lower_lr=0.5, neumann_lr=1.0, neumann_steps=15)),
    "vrbo": (40, dict(upper_lr=0.5, lower_lr=0.5, neumann_lr=1.0, neumann_steps=15, inner_steps=2, period=4,
                      refresh_batches=8)),
}


@pytest.mark.parametrize("batch_size", [None, 128], ids=["full-batch", "stochastic"])
@pytest.mark.parametrize("name", sorted(CONVERGENCE))
def test_reduces_hypergradient_norm_on_quadratic(name, batch_size):
    steps, hp = CONVERGENCE[name]
    assert_reduces_hypergradient_norm(name, batch_size, steps, hp)


# ---------------------------------------------------------------------------------------------
# (d) invalid hyperparameters.

@pytest.mark.parametrize("name, hp, field", [
    ("sustain", dict(eta=0.0), "eta"),
    ("sustain", dict(eta=1.5), "eta"),
    ("mrbo", dict(upper_lr=0.0), "upper_lr"),
    ("mrbo", dict(lower_lr=-0.1), "lower_lr"),
    ("mrbo", dict(neumann_lr=math.nan), "neumann_lr"),
    ("mrbo", dict(neumann_lr="AUTO"), "neumann_lr"),
    ("vrbo", dict(neumann_lr="1/L"), "neumann_lr"),
    ("sustain", dict(neumann_steps=-1), "neumann_steps"),
    ("mrbo", dict(eta_decay=-0.5), "eta_decay"),
    ("sustain", dict(upper_lr_decay=math.inf), "upper_lr_decay"),
    ("vrbo", dict(period=0), "period"),
    ("vrbo", dict(inner_steps=0), "inner_steps"),
    ("vrbo", dict(refresh_batches=0), "refresh_batches"),
    ("vrbo", dict(neumann_steps=2.5), "neumann_steps"),
    ("vrbo", dict(upper_lr=-1.0), "upper_lr"),
])
def test_invalid_hyperparameters_raise(name, hp, field):
    with pytest.raises(ValueError, match=field):
        bilevel.make_solver(name, **hp)


def test_defaults_are_benchopts():
    for name in ("sustain", "mrbo"):
        s = bilevel.make_solver(name)
        # benchopt's n_shia_steps 10 (MRBO) = 10 products; n_hia_steps 10 (SUSTAIN) draws q in {0..9}
        assert (s.upper_lr, s.lower_lr, s.neumann_lr, s.eta, s.neumann_steps) == \
            (0.1, 0.1, "auto", 0.5, 9 if name == "sustain" else 10)
        assert s.fresh_hessian_batches
        assert (s.lower_lr_decay, s.neumann_lr_decay, s.eta_decay, s.upper_lr_decay) == (1 / 3, 0.0, 2 / 3, 1 / 3)
    v = bilevel.make_solver("vrbo")
    assert (v.upper_lr, v.lower_lr, v.neumann_lr, v.neumann_steps, v.inner_steps) == (0.1, 0.1, "auto", 10, 10)

"""Tests of bilevel.lower: the lower-level loops, step by step against hand computations."""
import pytest
import torch

from bilevel import lower
from bilevel.lower import SGD, SGDState, Nesterov, Periodic, sgd_steps, warm_start
from bilevel.oracles import count_calls

DT = torch.float64


@pytest.fixture
def det(quad):
    """The quadratic problem with deterministic (full-batch) losses: sample() -> None."""

    class Deterministic(type(quad)):
        def sample(self, level, generator):
            return None
    return Deterministic()


def grad(problem, x, yf, batch=None):
    """grad_y g = Ab y + Cb^T x + ab (dense, on the flat vectors)."""
    return problem.grad_y_g(problem.x_flat(x), yf, batch)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_sgd_k_steps_equal_hand_gradient_steps(det):
    x, y0 = det.point(at_solution=False)
    lr, k = 0.15, 4
    loop = SGD(lr=lr, steps=k)
    state = loop.init(y0)
    assert isinstance(state, SGDState)
    with count_calls() as c:
        state = loop.step(det, x, state, gen())
    assert c["grad_lower"] == k and c.total == k
    yf = det.y_flat(y0)
    for _ in range(k):
        yf = yf - lr * grad(det, x, yf)
    assert torch.allclose(det.y_flat(loop.point(state)), yf, rtol=0, atol=1e-13)
    assert set(loop.point(state)) == {"w", "b"}
    # a second outer iteration continues from there
    state = loop.step(det, x, state, gen(), iteration=1)
    for _ in range(k):
        yf = yf - lr * grad(det, x, yf)
    assert torch.allclose(det.y_flat(state.y), yf, rtol=0, atol=1e-13)


def test_sgd_converges_to_lower_solution(det):
    x, y0 = det.point(at_solution=False)
    y = sgd_steps(det, x, y0, lr=1.0 / det.lipschitz(), steps=300, generator=gen())
    assert torch.allclose(det.y_flat(y), det.y_star(det.x_flat(x)), rtol=0, atol=1e-8)


def test_init_copies_and_update_does_not_modify_input(det):
    x, y0 = det.point(at_solution=False)
    snapshot = {k: v.clone() for k, v in y0.items()}
    for loop in (SGD(lr=0.1, steps=2), Nesterov(lr=0.1)):
        state = loop.init(y0)
        for field in state:
            if field is not None:
                assert all(field[k] is not y0[k] for k in y0)
        loop.step(det, x, state, gen())
    for k in y0:
        assert torch.equal(y0[k], snapshot[k])


def test_nesterov_two_updates(det):
    x, y0 = det.point(at_solution=False)
    lr, gamma, tau = 0.1, 0.6, 0.3
    loop = Nesterov(lr=lr, momentum=gamma, averaging=tau)
    state = loop.init(y0)
    state = loop.step(det, x, state, gen(), iteration=0)
    state = loop.step(det, x, state, gen(), iteration=1)

    y_prev = y = y_avg = det.y_flat(y0)
    for _ in range(2):
        w = y + gamma * (y - y_prev)
        y_new = w - lr * grad(det, x, w)
        y_avg = (1 - tau) * y_avg + tau * y_new
        y_prev, y = y, y_new
    assert torch.allclose(det.y_flat(state.y), y, rtol=0, atol=1e-13)
    assert torch.allclose(det.y_flat(state.y_prev), y_prev, rtol=0, atol=1e-13)
    assert torch.allclose(det.y_flat(state.y_avg), y_avg, rtol=0, atol=1e-13)
    assert torch.allclose(det.y_flat(loop.point(state)), y_avg, rtol=0, atol=1e-13)
    # point() is the average, not the last iterate
    assert float((det.y_flat(loop.point(state)) - y).abs().max()) > 1e-3


def test_nesterov_steps_per_update_average_once(det):
    """steps SNAG steps as repeated single steps, but the average moves once per update (AccBO
    averages once per outer iteration): yhat = (1 - tau) yhat_0 + tau y_3, not three lerps."""
    x, y0 = det.point(at_solution=False)
    tau = 0.5
    multi = Nesterov(lr=0.1, momentum=0.4, averaging=tau, steps=3)
    single = Nesterov(lr=0.1, momentum=0.4, averaging=tau, steps=1)
    with count_calls() as c:
        a = multi.step(det, x, multi.init(y0), gen())
    assert c["grad_lower"] == 3
    b = single.init(y0)
    for _ in range(3):
        b = single.step(det, x, b, gen())
    for fa, fb in zip(a[:2], b[:2]):  # y, y_prev
        assert torch.allclose(det.y_flat(fa), det.y_flat(fb), rtol=0, atol=1e-14)
    once = (1 - tau) * det.y_flat(y0) + tau * det.y_flat(a.y)
    assert torch.allclose(det.y_flat(a.y_avg), once, rtol=0, atol=1e-14)
    assert float((det.y_flat(a.y_avg) - det.y_flat(b.y_avg)).abs().max()) > 1e-6


def test_periodic_nesterov_averages_on_skipped_iterations(det):
    """Periodic calls the loop's idle() on skipped iterations: no gradient, y fixed, yhat lerps."""
    x, y0 = det.point(at_solution=False)
    tau = 0.3
    loop = Periodic(Nesterov(lr=0.1, momentum=0.4, averaging=tau, steps=2), period=2)
    state = loop.step(det, x, loop.init(y0), gen(), iteration=0)
    with count_calls() as c:
        skipped = loop.step(det, x, state, gen(), iteration=1)
    assert c["grad_lower"] == 0
    assert torch.equal(det.y_flat(skipped.y), det.y_flat(state.y))
    assert torch.equal(det.y_flat(skipped.y_prev), det.y_flat(state.y_prev))
    expected = (1 - tau) * det.y_flat(state.y_avg) + tau * det.y_flat(state.y)
    assert torch.allclose(det.y_flat(loop.point(skipped)), expected, rtol=0, atol=1e-14)


def test_periodic_updates_only_every_period(det):
    x, y0 = det.point(at_solution=False)
    inner = SGD(lr=0.1, steps=2)
    loop = Periodic(inner, period=3)
    state = loop.init(y0)
    calls, changed = [], []
    for t in range(8):
        before = det.y_flat(loop.point(state))
        with count_calls() as c:
            state = loop.step(det, x, state, gen(t), iteration=t)
        calls.append(c["grad_lower"])
        changed.append(not torch.equal(det.y_flat(loop.point(state)), before))
    assert calls == [2, 0, 0, 2, 0, 0, 2, 0]
    assert changed == [True, False, False, True, False, False, True, False]
    # the result is three inner updates
    ref = inner.init(y0)
    for _ in range(3):
        ref = inner.step(det, x, ref, gen())
    assert torch.allclose(det.y_flat(state.y), det.y_flat(ref.y), rtol=0, atol=1e-14)


def test_periodic_invalid_period():
    for p in (0, -2):
        with pytest.raises(ValueError):
            Periodic(SGD(lr=0.1), period=p)


@pytest.mark.parametrize("wrap", [False, True])
def test_warm_start_runs_single_steps_ignoring_loop_steps(det, wrap):
    x, y0 = det.point(at_solution=False)
    lr, T0 = 0.12, 5
    loop = SGD(lr=lr, steps=7)
    if wrap:
        loop = Periodic(loop, period=4)
    with count_calls() as c:
        state = warm_start(loop, det, x, loop.init(y0), T0, gen())
    assert c["grad_lower"] == T0
    yf = det.y_flat(y0)
    for _ in range(T0):
        yf = yf - lr * grad(det, x, yf)
    assert torch.allclose(det.y_flat(loop.point(state)), yf, rtol=0, atol=1e-13)


def test_warm_start_nesterov_uses_single_nesterov_steps(det):
    x, y0 = det.point(at_solution=False)
    loop = Nesterov(lr=0.1, momentum=0.5, averaging=0.4, steps=4)
    state = warm_start(Periodic(loop, period=2), det, x, loop.init(y0), 3, gen())
    single = Nesterov(lr=0.1, momentum=0.5, averaging=0.4, steps=1)
    ref = single.init(y0)
    for _ in range(3):
        ref = single.step(det, x, ref, gen())
    for fa, fb in zip(state, ref):
        assert torch.allclose(det.y_flat(fa), det.y_flat(fb), rtol=0, atol=1e-14)


def test_warm_start_zero_steps_is_identity(det):
    x, y0 = det.point(at_solution=False)
    loop = SGD(lr=0.1, steps=3)
    s0 = loop.init(y0)
    state = warm_start(loop, det, x, s0, 0, gen())
    assert torch.equal(det.y_flat(state.y), det.y_flat(y0))


class Recording:
    """Wraps a problem and records every lower batch the losses receive."""

    def __init__(self, problem):
        self.problem, self.batches = problem, []

    def sample(self, level, generator):
        return self.problem.sample(level, generator)

    def lower_loss(self, x, y, batch):
        self.batches.append(batch)
        return self.problem.lower_loss(x, y, batch)

    def upper_loss(self, x, y, batch):
        return self.problem.upper_loss(x, y, batch)


def test_stochastic_sgd_draws_a_fresh_batch_every_step(quad):
    x, y0 = quad.point(at_solution=False)
    rec = Recording(quad)
    lr, k = 0.1, 4
    g = gen(123)
    state_before = g.get_state().clone()
    loop = SGD(lr=lr, steps=k)
    state = loop.step(rec, x, loop.init(y0), g)
    assert not torch.equal(g.get_state(), state_before)  # the generator advanced
    assert len(rec.batches) == k
    assert all(b is not None and b.shape == (quad.batch_size,) for b in rec.batches)
    assert len({tuple(b.tolist()) for b in rec.batches}) > 1  # not the same batch every step
    # the batches are consecutive draws from the generator, and the steps use them
    g2 = gen(123)
    expected_batches = [quad.sample("lower", g2) for _ in range(k)]
    for b, e in zip(rec.batches, expected_batches):
        assert torch.equal(b, e)
    assert torch.equal(g.get_state(), g2.get_state())
    yf = quad.y_flat(y0)
    for b in expected_batches:
        yf = yf - lr * grad(quad, x, yf, b)
    assert torch.allclose(quad.y_flat(state.y), yf, rtol=0, atol=1e-13)
    # ...which differs from full-batch steps
    yfull = quad.y_flat(y0)
    for _ in range(k):
        yfull = yfull - lr * grad(quad, x, yfull)
    assert float((yf - yfull).abs().max()) > 1e-6


def test_stochastic_nesterov_draws_a_fresh_batch_every_step(quad):
    x, y0 = quad.point(at_solution=False)
    rec = Recording(quad)
    loop = Nesterov(lr=0.1, steps=3)
    state = loop.init(y0)
    g = gen(7)
    state = loop.step(rec, x, state, g)
    state = loop.step(rec, x, state, g, iteration=1)
    assert len(rec.batches) == 6
    g2 = gen(7)
    assert all(torch.equal(b, quad.sample("lower", g2)) for b in rec.batches)


def test_sgd_step_module_function(det):
    x, y0 = det.point(at_solution=False)
    y1 = lower.sgd_step(det, x, y0, 0.2, gen())
    assert torch.allclose(det.y_flat(y1), det.y_flat(y0) - 0.2 * grad(det, x, det.y_flat(y0)),
                          rtol=0, atol=1e-14)


def test_sgd_step_size_schedule_uses_the_outer_iteration():
    """lr given as a schedule t -> c / (t + 1): iteration 3 uses c / 4."""
    from bilevel.problem import FunctionProblem
    from bilevel.upper import polynomial_decay
    p = FunctionProblem(lambda x, y, b: (y["w"] ** 2).sum(), lambda x, y, b: 0.5 * (y["w"] ** 2).sum(),
                        {"l": torch.zeros(1, dtype=torch.float64)}, {"w": torch.ones(2, dtype=torch.float64)})
    x, y = p.init(None)
    loop = lower.SGD(polynomial_decay(0.8, 1.0))
    out = loop.step(p, x, loop.init(y), None, iteration=3)
    torch.testing.assert_close(out.y["w"], torch.full((2,), 1 - 0.2, dtype=torch.float64))

"""F2SA against benchopt: its draw order replayed on a fixed stream, no discarded gradient, and
the multiplier's schedule (solvers/f2sa.py).

benchopt's ``f2sa.py`` draws, per inner step, a lower batch for the penalized copy y, a lower
batch for the lower copy z, then an upper batch for y; for the hypergradient an upper batch and
two lower batches (y's, then z's). The hand-written recursion below consumes the replayed
streams in exactly that order.
"""
import math

import pytest
import torch

import bilevel
import bilevel.solvers.f2sa  # noqa: F401  (registers "f2sa")
from bilevel import count_calls
from bilevel.problem import BilevelProblem
from bilevel.problems.quadratic import Quadratic
from bilevel.sampling import run_generator

from replay import Replay, block_streams, quadratic_grads

HP = dict(upper_lr=0.2, lower_lr=0.3, inner_steps=3, lambda0=2.0, delta_lambda=0.5, lower_lr_decay=4 / 7,
          penalty_lr_decay=5 / 7, upper_lr_decay=4 / 7, lambda_decay=1 / 7)
PERMUTATIONS = {"lower": [[3, 1, 0, 2], [0, 2, 3, 1], [2, 3, 1, 0], [1, 0, 3, 2], [3, 2, 0, 1], [2, 0, 1, 3]] * 2,
                "upper": [[1, 2, 0], [2, 1, 0], [0, 2, 1], [1, 0, 2]] * 3}


def tiny():
    return Quadratic(n_samples_inner=32, n_samples_outer=24, dim_inner=3, dim_outer=2, batch_size=8, seed=1)


def benchopt_f2sa(problem, streams, steps, hp):
    """benchopt's F2SA recursion, written out; yields (x, y, z, lambda) after each step."""
    lower, upper = (iter(streams[k]) for k in ("lower", "upper"))
    f, g = problem.upper_samples, problem.lower_samples
    x0, y0 = problem.init(None)
    x, y, z, lam = x0["x"].clone(), y0["z"].clone(), y0["z"].clone(), hp["lambda0"]
    for t in range(steps):
        alpha = hp["lower_lr"] / (t + 1) ** hp["penalty_lr_decay"]
        gamma = hp["lower_lr"] / (t + 1) ** hp["lower_lr_decay"]
        xi = hp["upper_lr"] / (t + 1) ** hp["upper_lr_decay"]
        for _ in range(hp["inner_steps"]):
            start_inner, start_lagrangian, start_outer = next(lower), next(lower), next(upper)
            d_y = lam * quadratic_grads(g, start_inner, x, y)[1] + quadratic_grads(f, start_outer, x, y)[1]
            d_z = quadratic_grads(g, start_lagrangian, x, z)[1]
            y, z = y - alpha * d_y, z - gamma * d_z
        start_outer, start_inner1, start_inner2 = next(upper), next(lower), next(lower)
        d_x = quadratic_grads(f, start_outer, x, y)[0] + lam * (
            quadratic_grads(g, start_inner1, x, y)[0] - quadratic_grads(g, start_inner2, x, z)[0])
        x, lam = x - xi * d_x, lam + hp["delta_lambda"] / (t + 1) ** hp["lambda_decay"]
        yield x, y, z, lam


def test_first_steps_match_benchopt_recursion_on_replayed_stream():
    problem = tiny()
    streams = block_streams(problem, PERMUTATIONS, 40)
    replay = Replay(problem, streams)
    solver, g = bilevel.make_solver("f2sa", **HP), run_generator(0)
    state = solver.init(replay, *replay.init(g), g)
    for x, y, z, lam in benchopt_f2sa(problem, streams, 3, HP):
        state = solver.step(replay, state)
        torch.testing.assert_close(state.x["x"], x, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.core.penalized["z"], y, rtol=0, atol=1e-12)  # penalized copy
        torch.testing.assert_close(state.y["z"], z, rtol=0, atol=1e-12)  # lower copy
        assert math.isclose(float(state.core.multiplier), lam, rel_tol=1e-15)
    # per step: 2 inner_steps + 2 lower batches, inner_steps + 1 upper batches, none left unused
    assert len(replay.streams["lower"]) == 40 - 3 * 8 and len(replay.streams["upper"]) == 40 - 3 * 4


class Tracing(BilevelProblem):
    """A tiny deterministic problem recording, per loss call, which of x and y require grad."""
    name = "tracing"

    def __init__(self):
        self.calls = []

    def _record(self, level, x, y):
        self.calls.append((level, x["x"].requires_grad, y["y"].requires_grad))

    def upper_loss(self, x, y, batch):
        self._record("upper", x, y)
        return ((y["y"] - 1) ** 2).sum() + (x["x"] ** 2).sum()

    def lower_loss(self, x, y, batch):
        self._record("lower", x, y)
        return ((y["y"] - x["x"]) ** 2).sum()

    def init(self, generator):
        return {"x": torch.zeros(2, dtype=torch.float64)}, {"y": torch.zeros(2, dtype=torch.float64)}


def test_each_gradient_is_taken_only_for_the_variable_used():
    """y-loop: grad_y f and grad_y g only; hypergradient: grad_x f and grad_x g only. Counted calls:
    inner_steps + 1 upper and 2 inner_steps + 2 lower gradients per step."""
    problem, steps = Tracing(), 4
    solver, g = bilevel.make_solver("f2sa", inner_steps=steps), run_generator(0)
    state = solver.init(problem, *problem.init(g), g)
    with count_calls() as counts:
        solver.step(problem, state)
    assert counts["grad_upper"] == steps + 1 and counts["grad_lower"] == 2 * steps + 2
    assert counts["hvp"] == counts["cross"] == 0
    calls = problem.calls
    assert calls.count(("upper", False, True)) == steps and calls.count(("upper", True, False)) == 1
    assert calls.count(("lower", False, True)) == 2 * steps and calls.count(("lower", True, False)) == 2
    assert len(calls) == 3 * steps + 3  # nothing else: no gradient with respect to both variables


@pytest.mark.parametrize("decay", [1 / 7, 6 / 7])
def test_multiplier_schedule(decay):
    """lambda_t = lambda0 + delta sum_{s=1}^t s^{-decay}: ~ (7/6) delta t^{6/7} with benchopt's
    1/7 (the default), ~ 7 delta t^{1/7} (the paper's rate) with 6/7."""
    problem, steps = Tracing(), 6
    solver, g = bilevel.make_solver("f2sa", inner_steps=1, lambda0=1.5, delta_lambda=0.3, lambda_decay=decay), run_generator(0)
    state = solver.init(problem, *problem.init(g), g)
    for t in range(1, steps + 1):
        state = solver.step(problem, state)
        assert math.isclose(float(state.core.multiplier), 1.5 + 0.3 * sum(s ** -decay for s in range(1, t + 1)), rel_tol=1e-14)
    assert solver.lambda_decay == decay and bilevel.make_solver("f2sa").lambda_decay == 1 / 7


def test_one_variable_gradients_are_zero_where_the_loss_ignores_that_variable():
    """grad_upper_y of an f free of y (cosh's upper level is): zeros, not an autograd error."""
    from bilevel import oracles
    from bilevel.problem import FunctionProblem
    problem = FunctionProblem(lambda x, y, b: (x["x"] ** 2).sum(), lambda x, y, b: ((y["y"] - x["x"]) ** 2).sum(),
                              {"x": torch.ones(2)}, {"y": torch.zeros(2)})
    x, y = problem.init(None)
    assert torch.equal(oracles.grad_upper_y(problem, x, y, None)["y"], torch.zeros(2))
    assert torch.equal(oracles.grad_upper_x(problem, x, y, None)["x"], 2 * torch.ones(2))
    assert torch.equal(oracles.grad_lower_x(problem, x, y, None)["x"], 2 * torch.ones(2))

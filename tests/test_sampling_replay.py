"""Replays against benchopt-style recursions written out by hand (the method of issue 8).

* SOBA on a replayed stream of benchopt's sampler (one lower block shared by grad_y g, the HVP
  and the cross product; one upper block), its v being -z here.
* MRBO's start: benchopt starts from zero directions and applies its STORM recursion at the
  first iteration, with the "old" point held in a memory initialized at the origin; from
  x_0 = y_0 = 0 that is exactly MRBO's zero_start (full batch, so only the recursion is tested).
"""
import torch

import bilevel
import bilevel.solvers.mrbo  # noqa: F401  (registers the solvers used below)
import bilevel.solvers.soba  # noqa: F401
from bilevel import tree
from bilevel.estimators import Draw
from bilevel.problems.quadratic import Quadratic
from bilevel.recursive import Sample, evaluate
from bilevel.sampling import run_generator

from replay import Replay, benchopt_blocks, block_streams, quadratic_grads, quadratic_products


def tiny(batch_size=8):
    return Quadratic(n_samples_inner=32, n_samples_outer=24, dim_inner=3, dim_outer=2, batch_size=batch_size, seed=2)


def test_benchopt_sampler_port_serves_k_plus_one_blocks_per_epoch():
    """The written-out benchopt stream: first epoch in order, the last block read twice."""
    assert benchopt_blocks(3, [[2, 0, 1], [1, 2, 0]], 10) == [0, 1, 2, 2, 2, 0, 1, 1, 1, 2]


def test_soba_matches_benchopt_recursion_on_replayed_stream():
    problem, lr_inner, lr_outer, steps = tiny(), 0.3, 0.2, 9  # 9 steps cross two lower epochs
    streams = block_streams(problem, {"lower": [[2, 0, 3, 1], [1, 3, 2, 0]] * 2, "upper": [[1, 2, 0], [2, 0, 1]] * 3},
                            steps)
    replay = Replay(problem, streams)
    solver, g = bilevel.make_solver("soba", upper_lr=lr_outer, lower_lr=lr_inner, z_lr=lr_inner), run_generator(0)
    state = solver.init(replay, *replay.init(g), g)
    x0, y0 = problem.init(None)
    x, y, v = x0["x"].clone(), y0["z"].clone(), torch.zeros(3, dtype=torch.float64)
    for start_inner, start_outer in zip(streams["lower"], streams["upper"]):
        grad_inner_var = quadratic_grads(problem.lower_samples, start_inner, x, y)[1]
        hvp, cross_v = quadratic_products(problem.lower_samples, start_inner, v)
        grad_out_outer, grad_in_outer = quadratic_grads(problem.upper_samples, start_outer, x, y)
        y, v, x = (y - lr_inner * grad_inner_var, v - lr_inner * (hvp + grad_in_outer),
                   x - lr_outer * (cross_v + grad_out_outer))
        state = solver.step(replay, state)
        torch.testing.assert_close(state.x["x"], x, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.y["z"], y, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.core.z["z"], -v, rtol=0, atol=1e-12)
    assert replay.streams == {"lower": [], "upper": []}


def test_mrbo_first_steps_match_benchopt_zero_start():
    problem = tiny(batch_size=None)  # full batch: G is deterministic
    hp = dict(upper_lr=0.3, lower_lr=0.4, eta=0.6, neumann_lr=0.5, neumann_steps=4, upper_lr_decay=1 / 3,
              lower_lr_decay=1 / 3, neumann_lr_decay=0.0, eta_decay=2 / 3)
    solver, g = bilevel.make_solver("mrbo", **hp), run_generator(0)
    zero_x, zero_y = {"x": torch.zeros(2, dtype=torch.float64)}, {"z": torch.zeros(3, dtype=torch.float64)}
    state = solver.init(problem, tree.clone(zero_x), tree.clone(zero_y), g)
    full = Sample(None, Draw(None, None, None, 0))

    def G(x, y, t):  # (grad_y g, hypergradient) at iteration t, the library's estimator
        d = evaluate(problem, solver.estimator(t), {"x": x}, {"z": y}, full)
        return d.lower["z"], d.upper["x"]

    x, y = zero_x["x"].clone(), zero_y["z"].clone()
    memory_inner, memory_outer = [torch.zeros(3, dtype=torch.float64)] * 2, [torch.zeros(2, dtype=torch.float64)] * 2
    for t in range(4):  # benchopt's mrbo_one_iter, with memory_*[0] the old point, memory_*[1] the direction
        eta, inner_lr, outer_lr = (hp["eta"] / (t + 1) ** hp["eta_decay"], hp["lower_lr"] / (t + 1) ** (1 / 3),
                                   hp["upper_lr"] / (t + 1) ** (1 / 3))
        new, old = G(x, y, t), G(memory_outer[0], memory_inner[0], t)
        memory_inner = [memory_inner[0], new[0] + (1 - eta) * (memory_inner[1] - old[0])]
        memory_outer = [memory_outer[0], eta * new[1] + (1 - eta) * (memory_outer[1] + new[1] - old[1])]
        memory_inner[0], memory_outer[0] = y, x
        y, x = y - inner_lr * memory_inner[1], x - outer_lr * memory_outer[1]
        state = solver.step(problem, state)
        torch.testing.assert_close(state.x["x"], x, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.y["z"], y, rtol=0, atol=1e-12)

"""The vmapped update of a batched run through torch.compile (bilevel.many_compile, ``compile=True``
with seeds/grid): each copy still equals its lone (eager) run, oracle calls included.

Most tests trace with dynamo's "eager" backend (the same single graph without inductor's code
generation: seconds instead of minutes on 2 cores); one slow test runs inductor itself.
"""
import warnings

import pytest
import torch

import bilevel
from bilevel import many_compile
from bilevel.compiled import CompileFallback
from bilevel.many import LoopFallback

from test_many import CASES, assert_same_run, digits, quadratic


def _compiled_equals_lone(problem, name, options, steps=4, seeds=(0, 1)):
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoopFallback)
        warnings.simplefilter("error", CompileFallback)
        runs = bilevel.solve(problem, name, steps=steps, seeds=list(seeds), eval_every=2, compile=True, **options)
    assert runs.batched and runs.compiled
    for copy in runs:
        assert_same_run(copy, bilevel.solve(problem, name, steps=steps, seed=copy.seed, eval_every=2, **options))
    return runs


def test_compiled_batched_soba_equals_lone_runs_and_is_reused(eager_backend):
    problem = digits()
    first = _compiled_equals_lone(problem, "soba", CASES["soba"])
    assert first.compile_seconds > 0
    again = _compiled_equals_lone(problem, "soba", CASES["soba"], seeds=(2, 3))  # same shapes: no new graph
    assert again.compile_seconds == 0


def test_compiled_grid_steps_enter_as_tensors_and_equal_lone_runs(eager_backend):
    """Grid points are per-copy step tensors (BatchedStep) inside the compiled graph too."""
    problem, grid = quadratic(), {"upper_lr": [0.2, 0.5], "lower_lr": [0.1, 0.3]}
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallback)
        runs = bilevel.solve(problem, "soba", steps=4, seeds=[0, 1], grid=grid, eval_every=2, compile=True, z_lr=0.3)
    assert runs.compiled and len(runs) == 8
    for copy in runs:
        assert_same_run(copy, bilevel.solve(problem, "soba", steps=4, seed=copy.seed, eval_every=2, z_lr=0.3, **copy.point))


def test_an_update_that_cannot_be_traced_runs_eagerly_with_one_warning(eager_backend):
    """A loss calling a function dynamo must not trace (fullgraph): the run continues with the
    eager vmapped update from the same state, one CompileFallback naming the reason."""
    @torch._dynamo.disable
    def untraceable(v):
        return v

    class Opaque(type(digits())):
        def lower_loss(self, x, y, batch):
            return untraceable(super().lower_loss(x, y, batch))

    problem = Opaque(n_train=200, n_val=100, n_test=200, batch_size=40, val_batch_size=25, dtype="float64")
    with pytest.warns(CompileFallback, match="the batched update runs eagerly"):
        runs = bilevel.solve(problem, "soba", steps=3, seeds=[0, 1], eval_every=3, compile=True, **CASES["soba"])
    assert runs.batched and not runs.compiled
    for copy in runs:
        assert_same_run(copy, bilevel.solve(problem, "soba", steps=3, seed=copy.seed, eval_every=3, **CASES["soba"]))


def test_compile_none_compiles_long_batched_runs_only():
    assert many_compile.wanted(None, many_compile.AUTO_STEPS) is True
    assert many_compile.wanted(None, many_compile.AUTO_STEPS - 1) is False
    assert many_compile.wanted(False, 10 ** 6) is False and many_compile.wanted(True, 1) is True
    with pytest.raises(TypeError, match="compile must be True, False or None"):
        many_compile.wanted("yes", 10)


@pytest.mark.slow
def test_inductor_compiled_batched_runs_equal_lone_runs_in_float64():
    many_compile.clear_cache()
    _compiled_equals_lone(digits(), "soba", CASES["soba"], steps=6, seeds=(0, 1, 2))

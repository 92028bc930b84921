"""CUDA graph capture of a batched run's step (bilevel.many_graph, ``cuda_graph=True``), on CPU.

A real capture needs a GPU. Everything around it is tested here with :class:`ReplayBackend`,
whose "replay" runs the captured Python function again on the static input buffers with the
integers it was captured with: what a CUDA graph computes (it re-executes the recorded kernels on
whatever the buffers hold, with every Python-level decision frozen). So a missing copy into the
buffers, a stale batch, a graph reused for an iteration whose step reads t differently, or
oracle calls counted at capture instead of at replay all make a copy differ from its lone run.
"""
import warnings

import pytest

import bilevel
from bilevel import many_graph, oracles
from bilevel.many import LoopFallback
from bilevel.many_graph import GraphFallback, Guarded
from bilevel.schedules import PolyDecay

from test_many import CASES, assert_same_run, digits


class ReplayBackend(many_graph.Backend):
    """Capture: ``warmup`` runs then one run whose outputs are the static outputs; replay: the
    same function on the static inputs, its outputs copied into the static outputs, its oracle
    calls not counted (a graph replay runs no Python)."""
    warmup = 1

    def __init__(self):
        self.captures, self.replays = 0, 0

    def capture(self, fn, inputs):
        for _ in range(self.warmup):
            fn(inputs)
        outputs = fn(inputs)
        self.captures += 1

        def replay():
            saved = [dict(c) for c in oracles._ACTIVE]
            new = fn(inputs)
            for counts, before in zip(oracles._ACTIVE, saved):
                counts.clear()
                counts.update(before)
            for out, value in zip(outputs, new):
                out.copy_(value)
            self.replays += 1
        return replay, outputs


@pytest.fixture
def backend(monkeypatch):
    made = ReplayBackend()
    monkeypatch.setattr(many_graph, "backend_for", lambda device: made)
    return made


def _batched_equals_lone(problem, name, options, steps=6, seeds=(0, 1, 2)):
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoopFallback)
        runs = bilevel.solve(problem, name, steps=steps, seeds=list(seeds), eval_every=2, cuda_graph=True, **options)
    assert runs.batched
    for copy in runs:
        assert_same_run(copy, bilevel.solve(problem, name, steps=steps, seed=copy.seed, eval_every=2, **options))
    return runs


def test_constant_steps_replay_one_graph_and_equal_lone_runs(backend):
    runs = _batched_equals_lone(digits(), "soba", CASES["soba"])
    assert runs.graphs == 1 and backend.captures == 1 and backend.replays == 6  # every step a replay


def test_a_periodic_lower_loop_keeps_one_graph_per_phase(backend):
    """BO-REP's lower loop runs when t % 2 == 0: its batches differ in structure, and the update
    reads t % 2; one graph per phase, each replayed on the iterations of its phase."""
    runs = _batched_equals_lone(digits(), "bo-rep", CASES["bo-rep"], steps=7)
    assert runs.graphs == 2 and backend.replays == 7


def test_a_decaying_step_reads_t_so_no_graph_is_reused(backend, monkeypatch):
    """lr_t = c / (t + 1)^e reads t + 1, different at every iteration: a graph captured at t
    must not be replayed at t + 1 (it would apply lr_t again); after max_graphs captures the run
    continues uncaptured, with one warning, and still equals the lone runs."""
    monkeypatch.setattr(many_graph, "MAX_GRAPHS", 3)
    options = dict(CASES["soba"], upper_lr=PolyDecay(0.5, 0.5))
    with pytest.warns(GraphFallback, match="more than max_graphs=3 graphs"):
        runs = _batched_equals_lone(digits(), "soba", options)
    assert runs.graphs == 3 and backend.replays == 3


def test_cuda_graph_on_a_cpu_device_names_the_option_and_the_device():
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device, but this run's device is 'cpu'"):
        bilevel.solve(digits(), "soba", steps=2, seeds=[0, 1], cuda_graph=True, **CASES["soba"])


def test_cuda_graph_needs_seeds_or_grid_and_excludes_compile():
    with pytest.raises(ValueError, match="cuda_graph=True applies to batched runs only"):
        bilevel.solve(digits(), "soba", steps=2, cuda_graph=True)
    with pytest.raises(ValueError, match="choose one"):
        bilevel.solve(digits(), "soba", steps=2, seeds=[0, 1], cuda_graph=True, compile=True)
    with pytest.raises(TypeError, match="cuda_graph must be True or False"):
        bilevel.solve(digits(), "soba", steps=2, seeds=[0, 1], cuda_graph="yes")


def test_a_step_that_cannot_be_captured_continues_uncaptured(monkeypatch):
    class Failing(many_graph.Backend):
        def capture(self, fn, inputs):
            raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(many_graph, "backend_for", lambda device: Failing())
    with pytest.warns(GraphFallback, match="could not be captured .RuntimeError: operation not permitted"):
        runs = _batched_equals_lone(digits(), "soba", CASES["soba"], steps=3)
    assert runs.graphs == 0


# -- the guarded integers -----------------------------------------------------------------------------

def test_guarded_records_how_an_integer_was_used():
    t = Guarded(4)
    assert t % 2 == 0 and t + 1 == 5 and 0.5 * t == 2.0 and list(range(t)) == [0, 1, 2, 3]
    assert not t.holds_for(6)  # t + 1, 0.5 * t and range(t) differ
    period = Guarded(6)
    assert period % 2 == 0
    assert period.holds_for(8) and period.holds_for(0) and not period.holds_for(7)
    unused = Guarded(3)
    assert unused.holds_for(100) and not unused.holds_for(True)  # a bool is not the same kind of value


def test_guarded_reflected_operations_and_other_guarded_operands():
    t, q = Guarded(3), Guarded(2)
    assert 10 - t == 7 and 2 ** t == 8 and 1 / (t + 1) == 0.25
    assert t * q == 6
    assert t.holds_for(3) and not t.holds_for(4)
    assert q.holds_for(2) and not q.holds_for(3)  # q entered t's operation: its exact value is guarded
    f = Guarded(5)
    assert f"{f}" == "5" and float(f) == 5.0 and f.bit_length() == 3
    assert not f.holds_for(6)

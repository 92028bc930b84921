"""Checkpoints (issue 9, items 1-3): plain data loaded with weights_only=True, provenance checked,
written atomically; every solver resumes bit for bit from a checkpoint file written when a run
was stopped at a random step."""
from __future__ import annotations

import errno
import multiprocessing
import os
import random

import pytest
import torch

import bilevel
from bilevel import CheckpointError, CheckpointMismatch, load_checkpoint, make_problem, make_solver, solve
from bilevel.checkpoint import atomic_write, decode, encode, save_checkpoint
from bilevel.experiment import new_run_dir
from bilevel.logging import JsonlLogger, read_jsonl
from bilevel.registry import SOLVERS
from bilevel.solve import Callback


@pytest.fixture(scope="module")
def squad():
    return make_problem("quadratic", preset="tiny")


class StopAt(Callback):
    def __init__(self, iteration):
        self.iteration = iteration

    def on_step(self, iteration):
        if iteration == self.iteration:
            raise KeyboardInterrupt


def without_time(history):
    return [{k: v for k, v in r.items() if k != "time"} for r in history]


@pytest.mark.parametrize("name", SOLVERS.names())
def test_every_solver_resumes_bit_for_bit_from_a_file_after_a_random_stop(squad, name, tmp_path):
    options = {"inner_steps": 2, "cg_steps": 2} if name == "aid-cg" else {}
    steps, stop = 12, random.Random(name).randrange(1, 11)
    full = solve(squad, name, steps=steps, seed=3, eval_every=4, **options)
    with pytest.raises(KeyboardInterrupt) as info:
        solve(squad, name, steps=steps, seed=3, eval_every=4, callbacks=[StopAt(stop)], **options)
    state = info.value.state
    assert state.iteration == stop
    path = tmp_path / f"{name}.state.pt"
    save_checkpoint(path, state, solver=make_solver(name, **options), problem=squad)
    torch.load(path, weights_only=True)  # plain data only
    checkpoint = load_checkpoint(path)
    resumed = solve(squad, name, steps=steps - stop, eval_every=4, state=checkpoint, **options,
                    initial_eval=False)
    for side in ("x", "y"):
        for key, value in getattr(full, side).items():
            assert torch.equal(getattr(resumed, side)[key], value), (name, side, key)
    expected = [r for r in without_time(full.history) if r["iteration"] > stop]
    assert without_time(resumed.history) == expected


def test_checkpoint_refuses_another_solver_options_problem_or_version(squad, tmp_path, monkeypatch):
    first = solve(squad, "soba", steps=3, eval_every=3, upper_lr=0.05)
    path = save_checkpoint(tmp_path / "soba.state.pt", first.state, solver=make_solver("soba", upper_lr=0.05),
                           problem=squad)
    checkpoint = load_checkpoint(path)
    with pytest.raises(CheckpointMismatch, match=r"'soba' state; it cannot continue solver 'aid-cg'"):
        solve(squad, "aid-cg", steps=2, state=checkpoint)
    with pytest.raises(CheckpointMismatch, match=r"bo-rep"):
        solve(squad, "bo-rep", steps=2, state=checkpoint)
    with pytest.raises(CheckpointMismatch, match=r"option upper_lr was 0.05 when it was written, 0.1 now"):
        solve(squad, "soba", steps=2, state=checkpoint, upper_lr=0.1)
    with pytest.raises(CheckpointMismatch, match=r"problem 'quadratic'.*'cosh'"):
        solve(make_problem("cosh"), "soba", steps=2, state=checkpoint, upper_lr=0.05)
    other = make_problem("quadratic", preset="tiny", dim_inner=7)
    other.problem_options, squad.problem_options = {"dim_inner": 7}, {}
    try:
        path2 = save_checkpoint(tmp_path / "b.pt", first.state, solver=make_solver("soba", upper_lr=0.05), problem=squad)
        with pytest.raises(CheckpointMismatch, match=r"problem option dim_inner was None when it was written, 7 now"):
            load_checkpoint(path2, problem=other)
    finally:
        del squad.problem_options
    monkeypatch.setattr(bilevel, "__version__", "9.9.9")
    with pytest.raises(CheckpointMismatch, match=r"written by bilevel 0.1.0; this is bilevel 9.9.9"):
        load_checkpoint(path, solver=make_solver("soba", upper_lr=0.05))
    monkeypatch.undo()
    assert solve(squad, "soba", steps=2, state=checkpoint, upper_lr=0.05).state.iteration == 5
    # the options a checkpoint records rebuild its solver
    again = solve(squad, checkpoint.solver, steps=2, state=checkpoint, **checkpoint.hyperparameters)
    assert again.state.iteration == 5 and again.hyperparameters["upper_lr"] == 0.05


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "bilevel-checkpoint", "state": Evil()}, path)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 4096)  # what a full disk left before (4 KB)
    with pytest.raises(CheckpointError, match="damaged or not a bilevel checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_encoding_round_trips_and_refuses_foreign_classes():
    from bilevel.lower import SGDState
    g = torch.Generator().manual_seed(5)
    value = {"a": (1, 2.5, None, True), "__odd": [torch.ones(2)], "s": SGDState(y={"w": torch.zeros(1)}), "g": g}
    back = decode(encode(value))
    assert back["a"] == (1, 2.5, None, True) and torch.equal(back["__odd"][0], torch.ones(2))
    assert isinstance(back["s"], SGDState) and torch.equal(back["s"].y["w"], torch.zeros(1))
    assert torch.equal(back["g"].get_state(), g.get_state())
    from collections import namedtuple
    Foreign = namedtuple("Foreign", "a")
    with pytest.raises(TypeError, match=r"state\['x'\] is a .*Foreign; only NamedTuples and dataclasses of the bilevel"):
        encode({"x": Foreign(1)})
    with pytest.raises(CheckpointError, match="outside the bilevel package"):
        decode({"__class__": "os:system", "fields": {}})
    with pytest.raises(TypeError, match=r"state\['f'\] holds a builtins.function"):
        encode({"f": lambda: 0})


def test_a_failed_write_keeps_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "soba.state.pt"
    atomic_write(path, b"old complete contents")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match=r"cannot write .*soba.state.pt \(No space left on device\)"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old complete contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soba.state.pt"]


def test_a_failed_jsonl_append_leaves_complete_lines(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    logger = JsonlLogger(path)
    logger.on_eval({"iteration": 0, "loss": 1.0})
    real_write = logger._file.write

    def half_then_full(data):
        real_write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logger._file, "write", half_then_full, raising=False)
    with pytest.raises(OSError, match="cannot append to .*m.jsonl"):
        logger.on_eval({"iteration": 1, "loss": 0.5})
    assert path.read_text().endswith("\n") and [r["iteration"] for r in read_jsonl(path)] == [0]


def _make_dirs(args):
    root, count = args
    return [str(new_run_dir(root, "same", "quadratic")) for _ in range(count)]


def test_concurrent_runs_with_one_name_never_collide(tmp_path):
    with multiprocessing.get_context("fork").Pool(8) as pool:
        folders = [f for chunk in pool.map(_make_dirs, [(str(tmp_path), 30)] * 8) for f in chunk]
    assert len(folders) == 240 and len(set(folders)) == 240


def test_a_schedule_hyperparameter_round_trips_through_a_checkpoint(squad, tmp_path):
    """A PolyDecay step size is stored in the config syntax and rebuilt as a PolyDecay, so the
    checkpoint's own hyperparameters continue the run exactly."""
    from bilevel.schedules import PolyDecay
    schedule = PolyDecay(0.2, 0.5)
    full = solve(squad, "soba", steps=6, seed=1, eval_every=3, upper_lr=schedule)
    first = solve(squad, "soba", steps=3, seed=1, eval_every=3, upper_lr=schedule)
    path = save_checkpoint(tmp_path / "soba.state.pt", first.state, solver=make_solver("soba", upper_lr=schedule),
                           problem=squad)
    checkpoint = load_checkpoint(path)
    assert checkpoint.hyperparameters["upper_lr"] == schedule
    resumed = solve(squad, checkpoint.solver, steps=3, eval_every=3, state=checkpoint, initial_eval=False,
                    **checkpoint.hyperparameters)
    assert torch.equal(resumed.x["x"], full.x["x"])

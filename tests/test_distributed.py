"""Data parallelism (bilevel.distributed): 2 gloo processes compute the single-process step.

Each 2-rank test runs in processes started by ``torch.multiprocessing.spawn`` (gloo, a file
rendezvous); every rank saves what it computed, and the test compares with the same run in
this process on the whole global batch, in float64, within 1e-6. The problem records the size
of every batch its losses see, so the tests also check that the ranks did compute on their own
slices (4 and 3 samples of a global batch of 7) and never on the whole batch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bilevel import distributed, solve
from bilevel.oracles import grad_lower, hvp_and_cross
from bilevel.problems.quadratic import Quadratic

BATCH = 7  # split 4 + 3 over two ranks: unequal weights 4/7 and 3/7


class RecordingQuadratic(Quadratic):
    """The quadratic problem, recording the size of every batch its losses are called on."""

    def __init__(self):
        super().__init__(n_samples_inner=64, n_samples_outer=64, dim_inner=5, dim_outer=4, batch_size=BATCH,
                         seed=3, dtype="float64")
        self.seen = []

    def _loss(self, level, x, y, batch):
        self.seen.append(None if batch is None else int(batch.numel()))
        return super()._loss(level, x, y, batch)


class SoftmaxWeighted:
    """A loss coupled across the batch, as BLISS's: g(x, y; B) = sum_{i in B} p_i l_i(y) with
    p = softmax over B of the scores s_i = <a_i, x>, l_i = 1/2 ||y - b_i||^2 (+ 1/2 ||y||^2);
    f(x, y; B) = mean over B of 1/2 ||y - c_i||^2 + 1/2 ||x||^2 / 10. Written per
    :func:`bilevel.distributed.gather_batch` (this rank's rows' sum divided by slice_weight)."""

    name = "softmax-weighted"

    def __init__(self, n=20, d=3):
        gen = torch.Generator().manual_seed(11)
        self.a, self.b, self.c = (torch.randn(n, d, generator=gen, dtype=torch.float64) for _ in range(3))

    def lower_loss(self, x, y, batch):
        scores = self.a[batch] @ x["w"]
        every, mine = distributed.gather_batch(scores)
        p = torch.softmax(every, dim=0)[mine]
        per_sample = 0.5 * (y["t"] - self.b[batch]).square().sum(dim=1)
        return (p * per_sample).sum() / distributed.slice_weight() + 0.5 * y["t"].square().sum()

    def upper_loss(self, x, y, batch):
        return 0.5 * (y["t"] - self.c[batch]).square().sum(dim=1).mean() + 0.05 * x["w"].square().sum()


def _coupled():
    """grad_lower and (hvp, cross, grad_y g) of :class:`SoftmaxWeighted` on a global batch of 7."""
    problem, gen = SoftmaxWeighted(), torch.Generator().manual_seed(6)
    x, y, v = ({k: torch.randn(3, generator=gen, dtype=torch.float64)} for k in ("w", "t", "t"))
    batch = torch.randperm(20, generator=gen)[:BATCH]
    return {"grad_lower": grad_lower(problem, x, y, batch), "hvp_cross_grad": hvp_and_cross(problem, x, y, v, batch)}


#: name: (solver, steps, options): a single-loop, a Neumann, a CG solver and AccBO's two-point
#: correction (h_t - h'_t on the same sample), the last also with forward-mode products.
RUNS = {
    "soba": ("soba", 6, {}),
    "stocbio": ("stocbio", 4, {}),
    "aid-cg": ("aid-cg", 4, {}),
    "accbo": ("accbo", 5, {"neumann_lr": 0.1}),
    "accbo-forward": ("accbo", 3, {"neumann_lr": 0.1, "hvp_mode": "forward"}),
}


def _run(name):
    solver, steps, options = RUNS[name]
    problem = RecordingQuadratic()
    result = solve(problem, solver, steps, seed=1, eval_every=2, **options)
    return {"x": result.x, "y": result.y, "history": result.history, "seen": problem.seen}


def _products(rank):
    """grad_lower and (hvp, cross, grad_y g) at a random point on a fixed global batch."""
    problem = RecordingQuadratic()
    gen = torch.Generator().manual_seed(5)
    x, y = problem.init(gen)
    x = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in x.items()}
    y = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in y.items()}
    v = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in y.items()}
    batch = torch.randperm(64, generator=gen)[:BATCH]
    out = {"grad_lower": grad_lower(problem, x, y, batch), "hvp_cross_grad": hvp_and_cross(problem, x, y, v, batch)}
    return out, problem.seen


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # resuming with another number of ranks: 2 ranks continue a 1-process state, and a
        # 2-rank state is continued by 1 process in the test
        single_state = torch.load(os.path.join(out_dir, "single.state.pt"), weights_only=False)
        resumed = solve(RecordingQuadratic(), "soba", 3, state=single_state, eval_every=3)
        result = {"products": _products(rank), "coupled": _coupled(), "runs": {name: _run(name) for name in RUNS},
                  "resumed": {"x": resumed.x, "y": resumed.y},
                  "partial": solve(RecordingQuadratic(), "soba", 3, seed=1, eval_every=3).state}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What each of 2 spawned gloo ranks computed (one spawn for the module: it costs seconds)."""
    out = tmp_path_factory.mktemp("two_ranks")
    torch.save(solve(RecordingQuadratic(), "soba", 3, seed=1, eval_every=3).state, out / "single.state.pt")
    mp.spawn(_worker, args=(2, str(out / "rendezvous"), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_oracles_sum_the_weighted_slices_over_two_ranks(two_ranks):
    ranks = [r["products"] for r in two_ranks]
    single, seen = _products(0)
    assert seen == [BATCH, BATCH]
    for (out, seen), rank in zip(ranks, (0, 1)):
        assert seen == [4, 4] if rank == 0 else seen == [3, 3]  # each rank its slice
        _close(out["grad_lower"], single["grad_lower"])
        _close(out["hvp_cross_grad"], single["hvp_cross_grad"])


def test_two_ranks_give_the_single_process_iterates(two_ranks):
    ranks = [r["runs"] for r in two_ranks]
    for name in RUNS:
        single = _run(name)
        assert BATCH in single["seen"]
        for rank, out in enumerate(ranks):
            _close(out[name]["x"], single["x"])
            _close(out[name]["y"], single["y"])
            # after validate()'s two direct loss calls, the whole batch of 7 never reaches a loss:
            # every oracle call was split (the last block of an epoch has 64 mod 7 = 1 sample,
            # fewer than the ranks: computed whole)
            assert out[name]["seen"][:2] == [BATCH, BATCH] and BATCH not in out[name]["seen"][2:], name
            assert (4 if rank == 0 else 3) in out[name]["seen"], name
            # evaluated once on rank 0, the same records on both ranks
            assert [r["iteration"] for r in out[name]["history"]] == [r["iteration"] for r in single["history"]]
            for got, want in zip(out[name]["history"], single["history"]):
                for key, value in want.items():
                    if key not in ("time",) and isinstance(value, float):
                        assert got[key] == pytest.approx(value, abs=1e-6), (name, key)
        drop_time = [[{k: v for k, v in r.items() if k != "time"} for r in out[name]["history"]] for out in ranks]
        assert drop_time[0] == drop_time[1]


def test_one_process_is_untouched():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard(torch.arange(7)) is None
    values = torch.arange(3.0)
    gathered, mine = distributed.gather_batch(values)
    assert gathered is values and mine == slice(0, 3)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}


def test_world_size_must_be_a_positive_int(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be a positive integer, got 'two'"):
        distributed.env_world_size()


def _final_eval(jsonl: Path) -> dict:
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    return [r for r in records if r.get("event") == "eval"][-1]


@pytest.mark.slow
def test_torchrun_cli_matches_the_single_process_run(tmp_path):
    """``torchrun --standalone --nproc_per_node=2 -m bilevel run ...`` finishes, writes one run
    folder (rank 0), and its records equal the single-process run's (float64, within 1e-6)."""
    from bilevel.cli import main
    args = ["run", "problem=hyperclean-digits", "solver=soba", "steps=50", "dtype=float64", "eval_every=25",
            f"output_dir={tmp_path}", "progress=false", "plot=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "bilevel", *args, "name=two"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1  # rank 0 speaks
    assert main([*args, "name=one"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no folder from rank 1
    two, one = _final_eval(tmp_path / "two" / "soba.jsonl"), _final_eval(tmp_path / "one" / "soba.jsonl")
    assert two["iteration"] == one["iteration"] == 50
    for key, value in one.items():
        if key != "time":
            assert two[key] == pytest.approx(value, abs=1e-6), key


def test_a_batch_coupled_softmax_equals_the_single_process_one(two_ranks):
    """gather_batch: the softmax runs over the whole global batch on every rank, and gradients,
    HVPs and cross products through it equal the single-process ones."""
    single = _coupled()
    for out in two_ranks:
        _close(out["coupled"]["grad_lower"], single["grad_lower"])
        _close(out["coupled"]["hvp_cross_grad"], single["hvp_cross_grad"])


def test_resume_with_another_number_of_ranks(two_ranks):
    """6 soba steps in one process = 3 in one process + 3 on two ranks = 3 on two ranks + 3 in one."""
    whole = _run("soba")
    continued = solve(RecordingQuadratic(), "soba", 3, state=two_ranks[0]["partial"], eval_every=3)
    _close(continued.x, whole["x"])
    _close(continued.y, whole["y"])
    for out in two_ranks:
        _close(out["resumed"]["x"], whole["x"])
        _close(out["resumed"]["y"], whole["y"])


BROKEN_RANK = '''
import torch
from bilevel import distributed
from bilevel.problems.quadratic import Quadratic


class BreaksOnRank1(Quadratic):
    """The quadratic problem, whose lower loss fails on rank 1 from its 40th call on."""

    def __init__(self):
        super().__init__(n_samples_inner=64, n_samples_outer=64, dim_inner=5, dim_outer=4, batch_size=8)
        self.calls = 0

    def lower_loss(self, x, y, batch):
        self.calls += 1
        if distributed.rank() == 1 and self.calls >= 40:
            raise RuntimeError("rank 1 broke on purpose")
        return super().lower_loss(x, y, batch)
'''


@pytest.mark.slow
def test_a_failing_rank_ends_the_torchrun_job_with_its_error(tmp_path):
    (tmp_path / "brokenrank.py").write_text(BROKEN_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "bilevel", "run", "problem=brokenrank:BreaksOnRank1", "solver=soba", "steps=200",
                           "eval_every=5", f"output_dir={tmp_path}", "name=broken", "progress=false",
                           "plot=false"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "rank 1 broke on purpose" in done.stderr
    # rank 0's records written before the failure are whole lines of valid JSON
    records = [json.loads(line) for line in (tmp_path / "broken" / "soba.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start" and records[1]["event"] == "eval"


def _bliss(rank):
    """BLISS's weights (this rank's rows), grad_lower and (hvp, cross, grad_y g) on a global
    batch of 7 pool sequences of the tiny data-selection problem, in float64."""
    from bilevel import make_problem
    problem = make_problem("data-selection", preset="tiny", dtype="float64", device="cpu")
    gen = torch.Generator().manual_seed(4)
    x, y = problem.init(gen)
    x = {k: v + 0.3 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in x.items()}  # varied scores
    v = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in y.items()}
    batch = torch.randperm(problem.n_samples("lower"), generator=gen)[:BATCH]
    part = distributed.shard(batch)
    local, weight = part if part is not None else (batch, 1.0)
    with distributed.on_slice(weight):
        weights = problem.weights(x, local)
    return {"weights": weights, "grad_lower": grad_lower(problem, x, y, batch),
            "hvp_cross_grad": hvp_and_cross(problem, x, y, v, batch)}


def _bliss_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_bliss(rank), os.path.join(out_dir, f"bliss{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_bliss_softmax_runs_over_the_global_batch(tmp_path):
    """On two ranks BLISS's softmax weights are the single-process weights of the global batch
    (rank 0 holds the first 4, rank 1 the last 3), and so are its gradients and products."""
    pytest.importorskip("tokenizers")
    mp.spawn(_bliss_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"bliss{r}.pt", weights_only=False) for r in range(2)]
    single = _bliss(0)
    assert ranks[0]["weights"].shape == (4,) and ranks[1]["weights"].shape == (3,)
    _close(torch.cat([ranks[0]["weights"], ranks[1]["weights"]]), single["weights"])
    assert float(single["weights"].sum()) == pytest.approx(1.0)
    for out in ranks:
        _close(out["grad_lower"], single["grad_lower"])
        _close(out["hvp_cross_grad"], single["hvp_cross_grad"])

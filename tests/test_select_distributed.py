"""``bilevel select`` under torchrun (issue 13): two gloo ranks write one run folder (rank 0's)
and keep the selection of a single-process run; the target / proxy training is data parallel
(each rank its slice of the global batch, equal to the single-process step); a failing rank
ends the job with its error and leaves the files already written valid."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("bilevel.problems.data_selection")

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bilevel.cli import main

# tests/test_select.py's tiny study, BLISS only (its bilevel phase is the data-parallel part), one round.
TINY = ["preset=tiny", "data=builtin", "max_documents=60", "max_sequences=120", "warmup_steps=4",
        "proxy_warmup_steps=4", "round_steps=4", "eval_every=2", "bilevel_steps=2", "mates_probes=6",
        "mates_epochs=1", "influence_probes=6", "batch_size=4", "progress=false",
        "solver_options.inner_steps=1", "solver_options.z_steps=1", "methods=[bliss]", "rounds=1"]


def _ids(run):
    rows = [json.loads(line) for line in (run / "seed0" / "bliss" / "round1" / "selected.jsonl").read_text().splitlines()]
    return [r["index"] for r in rows]


@pytest.mark.slow
def test_torchrun_select_writes_once_and_selects_as_one_process(tmp_path):
    args = ["select", *TINY, f"output_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    def torchrun():
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "bilevel", *args, "name=two"], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=900)
    done = torchrun()
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1  # rank 0 speaks (before: both ranks printed the table)
    assert main([*args, "name=one"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    two, one = tmp_path / "two", tmp_path / "one"
    # the same files, none left half-written by a second writer
    files = lambda run: sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert files(two) == files(one)
    assert not [p for p in two.rglob("*.tmp")]
    # BLISS's bilevel phase ran data parallel (float32 sums in another order): the scores agree
    # to rounding and the kept sequences are the single process's
    s2 = np.load(two / "seed0" / "bliss" / "round1" / "scores.npy")
    s1 = np.load(one / "seed0" / "bliss" / "round1" / "scores.npy")
    np.testing.assert_allclose(s2, s1, rtol=1e-4, atol=1e-5)
    assert sorted(_ids(two)) == sorted(_ids(one))
    # the same command again resumes: every rank loads the finished round (rank 0 saw it), nothing is redone
    report = two / "seed0" / "bliss" / "round1" / "report.json"
    before = (report.stat().st_mtime_ns, report.read_text())
    again = torchrun()
    assert again.returncode == 0, again.stderr[-3000:]
    assert (report.stat().st_mtime_ns, report.read_text()) == before


def _train(seen=None):
    """3 data-parallel-able AdamW steps of a tiny float64 GPT-NeoX on 20 random sequences whose
    masks have different lengths (so the ranks' slices hold different token counts), global batch 5."""
    from bilevel.problems.language_model import build_lm, lm_config
    from bilevel.problems.selection_train import train_lm
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(64, (20, 16), generator=gen)
    lengths = torch.randint(4, 17, (20,), generator=gen)
    mask = torch.arange(16)[None, :] < lengths[:, None]
    model = build_lm(lm_config("tiny", "target", 64, 16, num_hidden_layers=1, hidden_size=16,
                               num_attention_heads=2, intermediate_size=32), seed=0, dtype=torch.float64)
    if seen is not None:
        model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[0]),
                                        with_kwargs=True)
    train_lm(model, tokens, mask, torch.arange(20), steps=3, batch_size=5, lr=1e-2, seed=7)
    return {k: v.detach() for k, v in model.named_parameters()}


def _train_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        seen = []
        params = _train(seen)
        torch.save({"params": params, "seen": seen}, os.path.join(out_dir, f"train{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_lm_training_is_data_parallel_and_equals_the_single_process_run(tmp_path):
    """Each rank's forward sees its slice (3 and 2 sequences of the global batch of 5; before: the
    whole batch on every rank) and the trained weights are the single-process ones."""
    mp.spawn(_train_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"train{r}.pt", weights_only=False) for r in range(2)]
    seen = []
    single = _train(seen)
    assert seen == [5, 5, 5]
    assert ranks[0]["seen"] == [3, 3, 3] and ranks[1]["seen"] == [2, 2, 2]
    for out in ranks:
        # token CE is computed in float32 (selection_metrics.token_losses): sums in another order
        torch.testing.assert_close(out["params"], single, atol=1e-6, rtol=0)
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], atol=0, rtol=0)  # identical replicas


BREAKS = '''
import sys

from bilevel import distributed
from bilevel.cli import main
from bilevel.problems import selection_train

_train, calls = selection_train.train_lm, [0]


def breaking(*args, **kwargs):
    """train_lm, failing on rank 1 at its 4th call (after the 2 warm-ups and round 1's training)."""
    calls[0] += 1
    if distributed.rank() == 1 and calls[0] == 4:
        raise RuntimeError("rank 1 broke on purpose in select")
    return _train(*args, **kwargs)


selection_train.train_lm = breaking
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow
def test_a_failing_rank_ends_select_with_its_error_and_round_one_stays_valid(tmp_path):
    """Rank 1 fails in round 2's target training while rank 0 waits for it in the gradient
    all-reduce: torchrun ends the job with rank 1's error; round 1 (written by rank 0 before)
    is complete and valid, nothing half-written is left, and the same command resumes it."""
    (tmp_path / "breaks.py").write_text(BREAKS)
    args = ["select", *[a for a in TINY if not a.startswith(("methods=", "rounds="))], "methods=[random]", "rounds=2",
            f"output_dir={tmp_path}", "name=broken"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "breaks.py"), *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode != 0
    assert "rank 1 broke on purpose in select" in done.stderr
    run = tmp_path / "broken"
    seed_dir, round1 = run / "seed0", run / "seed0" / "random" / "round1"
    assert not (run / "seed0" / "random" / "round2" / "report.json").exists()
    assert not list(run.rglob("*.tmp"))
    report = json.loads((round1 / "report.json").read_text())
    assert report["round"] == 1 and report["method"] == "random"
    rows = [json.loads(line) for line in (round1 / "selected.jsonl").read_text().splitlines()]
    assert len(rows) == report["selected"]
    assert np.load(round1 / "scores.npy").shape == (report["pool"],)
    assert json.loads((round1 / "curve.json").read_text())[-1]["step"] == report["step"]
    assert set(torch.load(round1 / "state.pt", weights_only=False)) == {"target", "proxy", "state", "optimizer"}
    assert set(torch.load(seed_dir / "warmup.pt", weights_only=False)) == {"target", "proxy"}
    # resuming (one process here) keeps round 1 and runs round 2
    before = (round1 / "report.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (round1 / "report.json").stat().st_mtime_ns == before
    assert json.loads((run / "seed0" / "random" / "round2" / "report.json").read_text())["round"] == 2

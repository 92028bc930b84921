"""``bilevel select`` under torchrun (issue 13): two gloo ranks write one run folder (rank 0's)
and keep the selection of a single-process run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("bilevel.problems.data_selection")

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

"""Interrupted runs resume exactly (issue 9, items 1-3): SIGINT, SIGTERM and SIGKILL on a real
``bilevel run`` process, then ``bilevel resume``; the final records equal an uninterrupted run's.
The problem is a user class given as ``problem=slowmod:Slow`` (item 8), slowed down by an
environment variable only in the interrupted process, so that the signal lands mid-run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bilevel import cli, load_checkpoint
from bilevel.logging import read_jsonl

SLOW_MODULE = '''
import os, time, torch, bilevel

class Slow(bilevel.BilevelProblem):
    """Ridge-penalty tuning on 32 random samples, mini-batches of 8 drawn from the generator."""
    name = "slow"

    def __init__(self, dim: int = 4):
        g = torch.Generator().manual_seed(0)
        self.A, self.b = torch.randn(32, dim, generator=g), torch.randn(32, generator=g)

    def init(self, generator):
        d = self.A.shape[1]
        return {"l": torch.zeros(d)}, {"w": torch.zeros(d)}

    def sample(self, level, generator):
        time.sleep(float(os.environ.get("SLOW_SLEEP", "0")))
        return torch.randint(0, 32, (8,), generator=generator)

    def lower_loss(self, x, y, batch):
        A, b = (self.A, self.b) if batch is None else (self.A[batch], self.b[batch])
        return ((A @ y["w"] - b) ** 2).mean() + (x["l"].exp() * y["w"] ** 2).sum()

    def upper_loss(self, x, y, batch):
        A, b = (self.A, self.b) if batch is None else (self.A[batch], self.b[batch])
        return ((A @ y["w"] - b) ** 2).mean()

    def evaluate(self, x, y):
        return {"loss": float(self.upper_loss(x, y, None))}
'''

STEPS = 120


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    (folder / "slowmod.py").write_text(SLOW_MODULE)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("slowmod", None)


@pytest.fixture(scope="module")
def reference(module_dir):
    """The uninterrupted run, once."""
    assert cli.main(argv(module_dir, "reference", plot="false")) == 0
    return module_dir / "out" / "reference"


@pytest.fixture
def workdir(module_dir, tmp_path):
    return module_dir


def argv(workdir, name, plot="true"):
    return ["run", "problem=slowmod:Slow", "solvers=[soba,stocbio]", f"steps={STEPS}", "eval_every=10",
            "solver_options.soba.upper_lr=0.05", f"output_dir={workdir / 'out'}", f"name={name}", "progress=false",
            f"plot={plot}"]


def start_slow(workdir, name, sleep="0.005"):
    env = {**os.environ, "SLOW_SLEEP": sleep, "PYTHONPATH": str(workdir)}
    return subprocess.Popen([sys.executable, "-m", "bilevel.cli", *argv(workdir, name)], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def records(folder, solver):
    """Evaluation records without the wall-clock field."""
    return [{k: v for k, v in r.items() if k != "time"} for r in read_jsonl(folder / f"{solver}.jsonl")]


def copy_of(folder, name):
    import shutil
    target = folder.parent / name
    shutil.copytree(folder, target)
    return target


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130),
                                       pytest.param(signal.SIGTERM, 143, marks=pytest.mark.slow)])
def test_signal_saves_state_and_summaries_then_resume_equals_uninterrupted(workdir, reference, sig, code):
    proc = start_slow(workdir, f"stopped-{code}")
    folder = workdir / "out" / f"stopped-{code}"
    wait_for(folder / "soba.state.pt", proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert f"interrupted by {sig.name}" in stderr and "bilevel resume" in stderr and "Traceback" not in stderr
    checkpoint = load_checkpoint(folder / "soba.state.pt")
    assert checkpoint.kind == "interrupted" and 0 < checkpoint.iteration < STEPS
    summary = (folder / "summary.md").read_text()
    assert f"interrupted at iteration {checkpoint.iteration}" in summary and "not started" in summary
    assert (folder / "curves.png").is_file() and not list(folder.glob(".*.tmp"))

    assert cli.main(["resume", str(folder)]) == 0
    for solver in ("soba", "stocbio"):
        assert records(folder, solver) == records(reference, solver), solver
        assert load_checkpoint(folder / f"{solver}.state.pt").iteration == STEPS
    assert "interrupted" not in (folder / "summary.md").read_text()


def test_sigkill_resumes_from_the_last_periodic_checkpoint(workdir, reference):
    proc = start_slow(workdir, "killed")
    folder = workdir / "out" / "killed"
    wait_for(folder / "soba.state.pt", proc)
    time.sleep(0.3)
    proc.kill()
    proc.communicate(timeout=60)
    checkpoint = load_checkpoint(folder / "soba.state.pt")
    assert checkpoint.kind == "checkpoint" and checkpoint.iteration % 10 == 0
    # a torn last JSONL line, as a kill during a write leaves it
    with open(folder / "soba.jsonl", "a") as f:
        f.write('{"event": "eval", "iterat')
    assert cli.main(["resume", str(folder)]) == 0
    assert records(folder, "soba") == records(reference, "soba")


def test_resume_of_a_finished_run_changes_nothing(reference, capsys):
    folder = copy_of(reference, "finished")
    before = records(folder, "soba")
    assert cli.main(["resume", str(folder)]) == 0
    assert records(folder, "soba") == before
    assert "continuing" not in capsys.readouterr().out


def test_resume_errors_name_the_folder(tmp_path, capsys):
    assert cli.main(["resume", str(tmp_path / "nothing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert cli.main(["resume", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_of_another_solver(reference, capsys):
    folder = copy_of(reference, "swapped")
    (folder / "stocbio.state.pt").unlink()
    (folder / "soba.state.pt").rename(folder / "stocbio.state.pt")
    assert cli.main(["resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "'soba' state" in err and "'stocbio'" in err


def test_jsonl_lines_survive_as_json(reference):
    folder = reference
    for line in (folder / "soba.jsonl").read_text().splitlines():
        json.loads(line)

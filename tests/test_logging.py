"""Run output callbacks: JSONL metrics files, the progress bar, Weights & Biases (offline)."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

from bilevel import FunctionProblem, NonFiniteError, make_problem, solve
from bilevel.logging import JsonlLogger, ProgressBar, WandbLogger, read_jsonl

DT = torch.float64


def small_quadratic():
    return make_problem("quadratic", dim_inner=5, dim_outer=3, n_samples_inner=64, n_samples_outer=64)


@pytest.fixture(scope="module")
def squad():
    return small_quadratic()


def strict_loads(line):
    """json.loads refusing the non-standard NaN / Infinity tokens."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(line, parse_constant=refuse)


def lines_of(path):
    with open(path, encoding="utf-8") as f:
        return [strict_loads(line) for line in f]


def open_paths():
    """Files this process holds open (Linux /proc)."""
    fd_dir = Path("/proc/self/fd")
    out = set()
    for fd in fd_dir.iterdir():
        try:
            out.add(os.path.realpath(os.readlink(fd)))
        except OSError:
            pass
    return out


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to list open files")


def weird_metrics_problem():
    """Deterministic problem whose metrics include inf, -inf, nan and non-float values."""
    def evaluate(x, y):
        return {"ratio": float("inf"), "neg": float("-inf"), "undefined": float("nan"),
                "x0": float(x["l"][0]), "tag": "ok", "count": 3}
    return FunctionProblem(lambda x, y, b: 0.5 * ((y["w"] - 1) ** 2).sum() + 0.05 * (x["l"] ** 2).sum(),
                           lambda x, y, b: 0.5 * ((y["w"] - x["l"]) ** 2).sum(),
                           x0={"l": torch.zeros(2, dtype=DT)}, y0={"w": torch.zeros(2, dtype=DT)},
                           evaluate=evaluate, name="weird")


# ---------------------------------------------------------------------------------------------
# JSONL


@needs_proc
def test_jsonl_logger_writes_start_evals_end(squad, tmp_path):
    path = tmp_path / "deep" / "soba.jsonl"
    logger = JsonlLogger(path)
    assert path.parent.is_dir()
    result = solve(squad, "soba", steps=20, seed=1, eval_every=5, upper_lr=0.05, callbacks=[logger])
    lines = lines_of(path)
    assert [line["event"] for line in lines] == ["start"] + ["eval"] * 5 + ["end"]
    start, end = lines[0], lines[-1]
    assert start["solver"] == "soba" and start["problem"] == "quadratic"
    assert start["steps"] == 20 and start["seed"] == 1
    benchopt = {"value": 0.1, "decay": 0.5}  # SOBA's default step 0.1 / sqrt(t + 1), as a config writes it
    assert start["hyperparameters"] == {"upper_lr": 0.05, "lower_lr": benchopt, "z_lr": benchopt}
    assert end["iterations"] == 20 and end["wall_time"] == result.wall_time
    assert end["counts"] == dict(result.counts)
    records = read_jsonl(path)
    assert len(records) == len(result.history) == 5
    for record, expected in zip(records, result.history):
        assert record.pop("event") == "eval"
        assert record == expected            # same keys, same values (floats round-trip exactly)
    assert str(path.resolve()) not in open_paths(), "the JSONL file must be closed at the end"


@needs_proc
def test_jsonl_logger_on_failure_keeps_earlier_lines(tmp_path):
    problem = FunctionProblem(lambda x, y, b: 0.5 * ((y["w"] - 1) ** 2).sum() + 0.05 * (x["l"] ** 2).sum(),
                              lambda x, y, b: 0.5 * ((y["w"] - x["l"]) ** 2).sum(),
                              x0={"l": torch.ones(2, dtype=DT)}, y0={"w": torch.zeros(2, dtype=DT)},
                              evaluate=lambda x, y: {"x0": float(x["l"][0])}, name="blowup")
    path = tmp_path / "soba.jsonl"
    seen = []

    class Spy(JsonlLogger):
        def on_eval(self, record):
            seen.append(dict(record))
            super().on_eval(record)

    with pytest.raises(NonFiniteError) as info:
        solve(problem, "soba", steps=200, eval_every=1, upper_lr=1e200, callbacks=[Spy(path)])
    lines = lines_of(path)
    events = [line["event"] for line in lines]
    assert events[0] == "start" and events[-1] == "error"
    assert events[1:-1] == ["eval"] * len(seen) and len(seen) >= 1
    assert [{k: v for k, v in line.items() if k != "event"} for line in lines[1:-1]] == seen
    assert "NonFiniteError" in lines[-1]["error"]
    assert str(info.value) in lines[-1]["error"]
    assert len(read_jsonl(path)) == len(seen)
    assert str(path.resolve()) not in open_paths(), "the JSONL file must be closed after an error"


def test_jsonl_non_finite_values_are_strings(tmp_path):
    path = tmp_path / "weird.jsonl"
    result = solve(weird_metrics_problem(), "soba", steps=2, eval_every=1, callbacks=[JsonlLogger(path)])
    text = path.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    records = read_jsonl(path)         # parses, i.e. valid JSON lines
    assert len(records) == 3
    for record, expected in zip(records, result.history):
        assert record["ratio"] == "inf" and record["neg"] == "-inf" and record["undefined"] == "nan"
        assert record["tag"] == "ok" and record["count"] == 3
        assert record["x0"] == expected["x0"]
    assert math.isinf(result.history[0]["ratio"]), "the in-memory history keeps the float"


# ---------------------------------------------------------------------------------------------
# Progress bar


def test_progress_bar_shows_solver_and_metrics(squad, capsys):
    result = solve(squad, "soba", steps=10, eval_every=5, progress=True)
    err = capsys.readouterr().err
    assert "soba on quadratic" in err
    assert "10/10" in err
    assert "grad_norm_sq" in err
    assert result.iterations == 10


def test_progress_bar_custom_description_and_close(squad, capsys):
    bar = ProgressBar(6, description="my-run")
    solve(squad, "lower-only", steps=6, eval_every=3, callbacks=[bar])
    err = capsys.readouterr().err
    assert "my-run" in err and "6/6" in err
    assert bar._bar is None


# ---------------------------------------------------------------------------------------------
# Weights & Biases (offline)


def wait_for_bytes(path, needle, timeout=15.0):
    """The file's bytes once they contain ``needle`` (or after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    blob = path.read_bytes()
    while needle not in blob and time.monotonic() < deadline:
        time.sleep(0.1)
        blob = path.read_bytes()
    return blob


def files_under(folder):
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


def test_wandb_mode_resolution(wandb_env, monkeypatch):
    assert WandbLogger().mode == "offline"                    # no WANDB_MODE, no key, no netrc
    assert WandbLogger(mode="disabled").mode == "disabled"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert WandbLogger().mode == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    (wandb_env["home"] / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert WandbLogger().mode is None                          # credentials: wandb decides (online)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    (wandb_env["home"] / ".netrc").unlink()
    assert WandbLogger().mode is None


def test_wandb_offline_run(wandb_env, squad):
    logger = WandbLogger(project="bilevel-tests", name="soba-test")
    assert logger.mode == "offline"
    result = solve(squad, "soba", steps=10, eval_every=5, callbacks=[logger])
    assert logger.run is None, "the run must be finished"
    runs = sorted((wandb_env["wandb_dir"] / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data = list(runs[0].glob("*.wandb"))
    assert len(data) == 1
    # wandb's service may still be writing the transaction log when finish() returns
    blob = wait_for_bytes(data[0], b"inner_distance")
    assert b"grad_norm_sq" in blob and b"inner_distance" in blob
    assert json.dumps(result.final["grad_norm_sq"]).encode() in blob


def test_wandb_logger_directory_and_error(wandb_env, tmp_path):
    problem = FunctionProblem(lambda x, y, b: 0.5 * ((y["w"] - 1) ** 2).sum() + 0.05 * (x["l"] ** 2).sum(),
                              lambda x, y, b: 0.5 * ((y["w"] - x["l"]) ** 2).sum(),
                              x0={"l": torch.ones(2, dtype=DT)}, y0={"w": torch.zeros(2, dtype=DT)},
                              evaluate=lambda x, y: {"x0": float(x["l"][0])}, name="blowup")
    folder = tmp_path / "explicit" / "wb"
    logger = WandbLogger(mode="offline", directory=str(folder))
    with pytest.raises(NonFiniteError):
        solve(problem, "soba", steps=200, eval_every=1, upper_lr=1e200, callbacks=[logger])
    assert logger.run is None, "on_error must finish the run"
    runs = list((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert files_under(wandb_env["wandb_dir"]) == []


def test_wandb_disabled_writes_nothing(wandb_env, squad, tmp_path):
    folder = tmp_path / "disabled"
    logger = WandbLogger(mode="disabled", directory=str(folder))
    result = solve(squad, "soba", steps=4, eval_every=2, callbacks=[logger])
    assert result.iterations == 4 and logger.run is None
    assert files_under(folder) == []
    assert files_under(wandb_env["wandb_dir"]) == []

"""Every problem's default tiny run (``bilevel run problem=NAME preset=tiny``) finishes "ok".

``bilevel run problem=NAME preset=tiny`` takes the problem's own default run, its
``RUNS["tiny"]`` (solvers, step sizes, steps; :func:`bilevel.config.default_run`), instead of
the main job's solvers, hyper-cleaning step sizes and 1000 steps. The CLI runs below use that
default solver set and its step sizes as they are (no solver option is overridden); problems
that read data get fixture files in the real formats (tests/data_fixtures.py), so nothing is
downloaded. The four problems on built-in data take about 40 s together on 2 loaded cores;
the four neural ones (hyperrep, auc, hpo-rnn, hyperclean) are marked ``slow`` (``-m slow``).
No timing is asserted: README lists the measured seconds.
"""
from __future__ import annotations

import csv

import pytest

from bilevel import cli
from bilevel.config import load
from bilevel.registry import PROBLEMS

#: problem -> overrides pointing a data problem at a fixture file ({rt}, {mnist}).
DATA = {
    "quadratic": [], "cosh": [], "hpo": [], "hyperclean-digits": [],
    "hyperrep": ["problem_options.data_path={mnist}"],
    "auc": ["problem_options.data_path={rt}"],
    "hpo-rnn": ["problem_options.data_path={rt}"],
    "hyperclean": ["problem_options.data_path={rt}"],
    "data-selection": [],
}
SLOW = {"hyperrep", "auc", "hpo-rnn", "hyperclean", "data-selection"}


def test_every_problem_has_a_default_tiny_run():
    builtin = [e for e in PROBLEMS.entries() if e.cls.__module__.startswith("bilevel.problems")]  # not tests' own
    assert sorted(DATA) == sorted(e.name for e in builtin)
    for entry in builtin:
        run = getattr(entry.cls, "RUNS", {}).get("tiny")
        assert run and run["solvers"] and run["steps"] > 0, entry.name
        assert set(run["solver_options"]) <= set(run["solvers"]), entry.name


def test_problem_and_preset_select_the_problems_default_run():
    from bilevel.problems.cosh import Cosh

    main = load(None, [])  # the main job is unchanged
    assert main.problem == "hyperclean-digits" and main.steps == 1000 and main.solver_options.soba.upper_lr == 50.0
    cfg = load(None, ["problem=cosh", "preset=tiny"])
    run = Cosh.RUNS["tiny"]
    assert list(cfg.solvers) == run["solvers"] and cfg.steps == run["steps"] == 200
    assert cfg.solver_options.soba.upper_lr == 0.005  # not the main job's 50 (hyper-cleaning), not the default
    # explicit settings still win, and a smaller solver set keeps its solvers' step sizes
    cfg = load(None, ["problem=cosh", "preset=tiny", "solvers=[soba]", "steps=7",
                      "solver_options.soba.lower_lr=0.25"])
    assert list(cfg.solvers) == ["soba"] and cfg.steps == 7
    assert dict(cfg.solver_options.soba) == {"upper_lr": 0.005, "lower_lr": 0.25, "z_lr": 0.5}
    # the main job's problem at its tiny preset: that problem's tiny run (200 steps, upper_lr 10)
    cfg = load(None, ["preset=tiny"])
    assert cfg.problem == "hyperclean-digits" and cfg.steps == 200 and cfg.solver_options.soba.upper_lr == 10.0
    # without a preset nothing changes but the dropped hyper-cleaning options
    cfg = load(None, ["problem=cosh"])
    assert cfg.steps == 1000 and dict(cfg.solver_options) == {}


@pytest.mark.parametrize("problem", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW else p for p in sorted(DATA)])
def test_default_tiny_run_finishes_ok(problem, run_files, tmp_path):
    settings = [s.format(**run_files) for s in DATA[problem]]
    code = cli.main(["run", f"problem={problem}", "preset=tiny", "progress=false", "plot=false",
                     f"output_dir={tmp_path}", "name=run", *settings])
    with open(tmp_path / "run" / "summary.csv", newline="") as fh:
        rows = {row["solver"]: row for row in csv.DictReader(fh)}
    run = PROBLEMS.get(problem).cls.RUNS["tiny"]
    assert sorted(rows) == sorted(run["solvers"])
    failed = {name: row["status"] for name, row in rows.items() if row["status"] != "ok"}
    assert not failed and code == 0, f"{problem}: {failed}"

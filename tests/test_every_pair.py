"""Every registered problem runs with every registered solver through ``bilevel run``.

One CLI run per problem, at its ``tiny`` preset, with all solvers at their default
hyperparameters for a few steps: each solver must finish with status ``ok`` (finite values, no
exception) and write its records. Problems that read data get learnable fixture files in the
real formats (tests/data_fixtures.py), so nothing is downloaded and no cache is needed.
"""
from __future__ import annotations

import csv

import pytest

from bilevel import cli
from bilevel.logging import read_jsonl
from bilevel.registry import PROBLEMS, SOLVERS
from data_fixtures import write_mnist_5k, write_rotten_tomatoes

STEPS = 2

#: problem -> extra overrides; "{rt}" / "{mnist}" become fixture files.
PROBLEM_SETTINGS = {
    "quadratic": [],
    "cosh": [],
    "hyperclean-digits": [],
    "hpo": [],
    "hyperclean": ["problem_options.data_path={rt}"],
    "hyperrep": ["problem_options.data_path={mnist}"],
    "auc": ["problem_options.data_path={rt}"],
    # At the tiny preset's weak penalty exp(-6) the RNN's lower level is not convex: aid-cg runs
    # because its CG truncates at negative curvature by default.
    "hpo-rnn": ["problem_options.data_path={rt}"],
}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return {"rt": str(write_rotten_tomatoes(folder / "rt.csv.bz2", n=900, positive_rate=0.7)),
            "mnist": str(write_mnist_5k(folder / "mnist.csv.gz", n_per_class=20))}


def test_settings_cover_every_registered_problem():
    assert sorted(PROBLEM_SETTINGS) == sorted(PROBLEMS.names())


def test_every_problem_has_tiny_and_paper_presets():
    for entry in PROBLEMS.entries():
        presets = getattr(entry.cls, "PRESETS", {})
        assert {"tiny", "paper"} <= set(presets), entry.name


@pytest.mark.parametrize("problem", sorted(PROBLEM_SETTINGS))
def test_every_solver_runs_on(problem, data_files, tmp_path):
    solvers = SOLVERS.names()
    settings = [s.format(**data_files) for s in PROBLEM_SETTINGS[problem]]
    code = cli.main(["run", f"problem={problem}", "preset=tiny", f"solvers=[{','.join(solvers)}]",
                     f"steps={STEPS}", "eval_every=1", "progress=false", "plot=false",
                     f"output_dir={tmp_path}", "name=run", *settings])
    with open(tmp_path / "run" / "summary.csv", newline="") as fh:
        rows = {row["solver"]: row for row in csv.DictReader(fh)}
    failed = {name: row["status"] for name, row in rows.items() if row["status"] != "ok"}
    assert not failed and code == 0, f"{problem}: {failed}"
    assert sorted(rows) == sorted(solvers)
    for name in solvers:
        records = read_jsonl(tmp_path / "run" / f"{name}.jsonl")
        assert [r["iteration"] for r in records] == list(range(STEPS + 1)), name

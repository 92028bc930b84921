"""``bilevel run seeds=[...] grid.FIELD=[...]``: the batched runs from the command line, their
files, the mean +- std table and the best grid point chosen on the problem's validation metric."""
from __future__ import annotations

import json

import pytest

import bilevel
from bilevel.config import ConfigError, load
from bilevel.experiment import run_experiment
from bilevel.report import mean_std

TINY = ["problem=hyperclean-digits", "preset=tiny", "solvers=[soba,lower-only]", "steps=6", "eval_every=3",
        "problem_options.dtype=float64", "solver_options.soba.z_lr=0.5", "solver_options.lower-only.lower_lr=0.5",
        "progress=false"]


@pytest.fixture(scope="module")
def many_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("many")
    cfg = load(None, [*TINY, f"output_dir={out}", "name=grid", "seeds=[0,1,2]", "grid.upper_lr=[1.0,10.0]",
                      "grid.lower_lr=[0.5]"])
    return cfg, run_experiment(cfg, echo=lambda *a: None)


def test_files_and_tables(many_run):
    cfg, result = many_run
    files = {p.name for p in result.run_dir.iterdir()}
    assert {"config.yaml", "soba.runs.jsonl", "lower-only.runs.jsonl", "summary.md", "summary.csv", "curves.png"} <= files
    text = (result.run_dir / "summary.md").read_text()
    assert "mean +- std over seeds" in text and "Best grid point per solver (min mean val_loss), then test_accuracy" in text
    records = [json.loads(line) for line in (result.run_dir / "soba.runs.jsonl").read_text().splitlines()]
    assert {(r["seed"], r["point"]["upper_lr"]) for r in records} == {(s, lr) for s in (0, 1, 2) for lr in (1.0, 10.0)}
    assert len(records) == 6 * 3  # 6 copies x evaluations at 0, 3, 6
    # lower-only has no upper_lr: the grid applies to it only through lower_lr
    assert [row["grid point"] for row in result.rows if row["solver"] == "lower-only"] == ["lower_lr=0.5"]


def test_table_is_mean_std_of_the_lone_runs(many_run):
    """The summary's cell for soba at upper_lr=10 is mean +- std of the three lone runs."""
    cfg, result = many_run
    problem = bilevel.make_problem("hyperclean-digits", preset="tiny", dtype="float64", device="cpu")
    finals = [bilevel.solve(problem, "soba", steps=6, seed=s, eval_every=3, upper_lr=10.0, lower_lr=0.5,
                            z_lr=0.5).final["test_accuracy"] for s in (0, 1, 2)]
    (row,) = [r for r in result.rows if r["solver"] == "soba" and r["grid point"] == "upper_lr=10 lower_lr=0.5"]
    assert row["test_accuracy"] == mean_std(finals) and "+-" in row["test_accuracy"]


def test_best_point_is_chosen_on_validation(many_run):
    cfg, result = many_run
    text = (result.run_dir / "summary.md").read_text()
    best = text.split("Best grid point per solver")[1]
    runs = result.outcomes["soba"]
    chosen = runs.best("val_loss", "min")["point"]
    assert f"upper_lr={chosen['upper_lr']:g} lower_lr=0.5" in best


@pytest.mark.parametrize("override, match", [
    ("seeds=[0,0]", "distinct"),
    ("grid.beta=[0.5]", "grid.beta: no selected solver has a step-size field"),
    ("grid.upper_lr=0.1", "grid.upper_lr must be a list"),
    ("grid.upper_lr=[0.1,-2]", "every value must be a positive number"),
    ("cuda_graph=true", "cuda_graph=true applies to runs with seeds or grid"),
    ("seeds=[0,1] cuda_graph=true compile=true", "choose one"),
])
def test_bad_seeds_and_grid_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load(None, [*TINY, *override.split()])


def test_mean_std_format():
    assert mean_std([1.0, 3.0]) == "2 +- 1.4"
    assert mean_std([0.5]) == "0.5" and mean_std([]) == "-"

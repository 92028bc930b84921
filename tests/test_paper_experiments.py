"""The paper experiment scripts (experiments/*_paper.py) and their shared protocol
(experiments/protocol.py): the edge column, the choice on the validation metric, epochs, and each
script end to end at a tiny size (a table printed, a figure written)."""
import importlib.util
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import write_rotten_tomatoes, write_sent140_leaf

from bilevel.many import Runs

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load(name):
    """experiments/NAME.py as a module (the scripts import ``protocol`` from their folder)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


protocol = load("protocol")


# -- the protocol's pieces ------------------------------------------------------------------------

def test_edge_names_the_axes_where_the_choice_is_extreme():
    grid = {"lower_lr": [0.01, 0.1, 0.5], "upper_lr": [0.001, 0.01, 0.1]}
    assert protocol.edge({"lower_lr": 0.1, "upper_lr": 0.01}, grid) == "interior"
    assert protocol.edge({"lower_lr": 0.5, "upper_lr": 0.01}, grid) == "lower_lr high"
    assert protocol.edge({"lower_lr": 0.01, "upper_lr": 0.1}, grid) == "lower_lr low, upper_lr high"
    # an axis with one value was not searched: said so, never "interior"
    assert protocol.edge({"lower_lr": 0.5, "upper_lr": 0.1}, {"lower_lr": [0.5], "upper_lr": [0.01, 0.1, 1]}) \
        == "lower_lr fixed"


def test_steps_and_grids():
    assert protocol.steps_for(20, 1 / 25) == 500          # 20 epochs of 25 iterations
    assert protocol.steps_for(0.01, 0.5) == 1
    with pytest.raises(ValueError, match="--epochs"):
        protocol.steps_for(0, 0.1)
    assert protocol.epochs_per_batch(32, 2500) == 32 / 2500 and protocol.epochs_per_batch(None, 10) == 1.0
    sgd = protocol.Method("soba", sgd_upper=True)
    assert protocol.grid_for(sgd, [0.1], [0.01, 0.5], 100.0) == {"lower_lr": [0.1], "upper_lr": [1.0, 50.0]}
    assert protocol.grid_for(protocol.Method("bo-rep"), [0.1], [0.01], 100.0)["upper_lr"] == [0.01]
    assert protocol.grid_for(protocol.Method("lower-only", lower_only=True), [0.1], [0.01], 1.0) == {"lower_lr": [0.1]}


def fake_runs(values, grid, seeds=(0, 1), diverged=()):
    """A Runs whose copy (point, seed) has final val = values[point][seed], test = 10 x val."""
    points = [dict(lower_lr=lo, upper_lr=up) for lo in grid["lower_lr"] for up in grid["upper_lr"]]
    results = []
    for point in points:
        for seed in seeds:
            key = (point["lower_lr"], point["upper_lr"])
            v = values[key][seed]
            error = "diverged" if (key, seed) in diverged else None
            results.append(types.SimpleNamespace(point=point, seed=seed, error=error,
                                                 final={"val": v, "test": 10 * v, "other": -v},
                                                 history=[{"iteration": 0}, {"iteration": 4}]))
    return Runs(results=results, seeds=list(seeds), points=points, batched=True, reason=None, wall_time=0.0)


def test_chosen_rows_pick_the_best_mean_validation_and_say_edge():
    grid = {"lower_lr": [0.1, 0.5], "upper_lr": [0.01, 0.1, 1.0]}
    values = {(lo, up): [1.0, 1.0] for lo in grid["lower_lr"] for up in grid["upper_lr"]}
    values[(0.5, 0.1)] = [0.2, 0.4]        # best mean (0.3): interior in upper, high in lower
    values[(0.1, 1.0)] = [0.0, 0.7]        # mean 0.35: second
    values[(0.1, 0.01)] = [0.0, 0.0]       # better still, but a seed diverged: not eligible
    values[(0.5, 0.01)] = [2.0, 3.0]       # the largest
    runs = fake_runs(values, grid, diverged={((0.1, 0.01), 1)})
    (row,) = protocol.chosen_rows({"m": (runs, grid)}, "val", "min", "test", ["other"])
    assert row["best grid point"] == "lower_lr=0.5 upper_lr=0.1"
    assert row["edge"] == "lower_lr high"
    assert row["val"].startswith("0.3 +- ") and row["test"].startswith("3 +- ") and row["other"].startswith("-0.3")
    (row,) = protocol.chosen_rows({"m": (runs, grid)}, "val", "max", "test", [])
    assert row["best grid point"] == "lower_lr=0.5 upper_lr=0.01" and row["edge"] == "lower_lr high, upper_lr low"


def test_add_epochs():
    runs = fake_runs({(0.1, 0.1): [1.0, 2.0]}, {"lower_lr": [0.1], "upper_lr": [0.1]})
    protocol.add_epochs(runs, 0.25)
    assert [r["epoch"] for r in runs[1].history] == [0.0, 1.0]


@pytest.mark.parametrize("name", ["hpo-rnn", "auc"])
def test_text_problems_run_vmapped_and_each_copy_equals_its_lone_run(name, tmp_path):
    """Token batches are trimmed to their longest row, a data-dependent shape that vmap cannot
    batch (before: every text problem fell back to a loop over copies); inside vmap they stay
    whole, which gives the same outputs (padding never reaches a feature)."""
    import bilevel
    path = write_rotten_tomatoes(tmp_path / "rt.csv.bz2", n=300, seed=0)
    problem = bilevel.make_problem(name, "tiny", device="cpu", data_path=str(path), n_train=40, n_val=40,
                                   n_test=40, hidden=3, embed_dim=3, fc=3, max_vocab=30, dtype="float64")
    runs = bilevel.solve(problem, "bo-rep", steps=4, seeds=[0, 1], eval_every=2, neumann_steps=2, neumann_lr=0.1)
    assert runs.batched, runs.reason
    lone = bilevel.solve(problem, "bo-rep", steps=4, seed=1, eval_every=2, neumann_steps=2, neumann_lr=0.1)
    for key in lone.x:
        torch.testing.assert_close(runs.get(1).x[key], lone.x[key], rtol=0, atol=1e-10)


def test_auc_evaluate_has_validation_and_train_auc(tmp_path):
    """val_auc / train_auc are the ROC AUC of the model's scores on those splits (the selection
    metric of the AUC experiment)."""
    from sklearn.metrics import roc_auc_score

    import bilevel
    path = write_rotten_tomatoes(tmp_path / "rt.csv.bz2", n=300, seed=0)
    problem = bilevel.make_problem("auc", "tiny", device="cpu", data_path=str(path), n_train=40, n_val=40,
                                   n_test=40, hidden=3, embed_dim=3, fc=3, max_vocab=30)
    assert problem.selection == ("val_auc", "max", "test_auc")
    x, y = problem.init(torch.Generator().manual_seed(0))
    metrics = problem.evaluate(x, y)
    for split in ("val", "train"):
        tokens, labels = getattr(problem.data, f"{split}_tokens"), getattr(problem.data, f"{split}_labels")
        with torch.no_grad():
            scores = problem.scores(x, tokens)
        assert metrics[f"{split}_auc"] == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-6)
    assert metrics["val_auc"] != metrics["train_auc"]


def test_hpo_rnn_evaluate_survives_a_runaway_log_reg(rt_path):
    """exp(log_reg) past the float range: reg_weight inf, not OverflowError (found by the grid run
    of hpo_rnn_paper.py, where SOBA at upper_lr 500 ended the whole batched grid search)."""
    import bilevel
    problem = bilevel.make_problem("hpo-rnn", "tiny", device="cpu", data_path=rt_path, n_train=30, n_val=30,
                                   n_test=30, hidden=3, embed_dim=3, fc=3, max_vocab=20)
    x, y = problem.init(torch.Generator().manual_seed(0))
    metrics = problem.evaluate({"log_reg": torch.tensor(800.0)}, y)
    assert metrics["reg_weight"] == float("inf") and metrics["log_reg"] == 800.0
    assert problem.evaluate(x, y)["reg_weight"] == pytest.approx(np.exp(-6.0))


# -- each script end to end -----------------------------------------------------------------------

def run_script(name, argv, capsys):
    rows = load(name).main(argv)
    out = capsys.readouterr().out
    assert "Every grid point" in out and re.search(r"\| solver +\| best grid point +\| edge +\|", out)
    return rows, out


def check_rows(rows, methods, out_dir):
    assert [r["solver"] for r in rows] == methods
    for row in rows:
        assert row["best grid point"] != "none finite" and row["edge"] != "-"
    assert (out_dir / "curves.png").stat().st_size > 0 and "edge" in (out_dir / "table.md").read_text()


def test_hyperclean_paper_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    rows, text = run_script("hyperclean_paper", ["--steps", "3", "--evals", "1", "--seeds", "0", "1",
                                                 "--lower", "0.1", "0.5", "--upper", "0.1", "0.5",
                                                 "--methods", "lower-only", "bo-rep", "--out", str(out)], capsys)
    check_rows(rows, ["lower-only", "bo-rep"], out)
    assert "3 outer iterations" in text


@pytest.fixture(scope="module")
def rt_path(tmp_path_factory):
    return str(write_rotten_tomatoes(tmp_path_factory.mktemp("papers") / "rt.csv.bz2", n=400, seed=0))


TINY_TEXT = ["--embed-dim", "4", "--max-vocab", "40", "--max-len", "12", "--evals", "1", "--seeds", "0", "1",
             "--lower", "0.05", "0.1", "--upper", "0.01", "0.1"]


def test_hyperrep_paper_end_to_end(rt_path, tmp_path, capsys):
    out = tmp_path / "out"
    rows, text = run_script("hyperrep_paper", [
        "--data-path", rt_path, "--train-tasks", "12", "--test-tasks", "4", "--tasks-per-batch", "3", "--shots", "2",
        "--enc-dim", "4", "--head-hidden", "0", "--epochs", "0.75", *TINY_TEXT,
        "--methods", "lower-only", "stocbio", "slip", "--out", str(out)], capsys)
    check_rows(rows, ["lower-only", "stocbio", "slip"], out)
    assert "3 outer iterations (0.75 epochs" in text


def test_auc_paper_on_a_user_sent140_file(tmp_path, capsys):
    """The user-file path: a LEAF Sentiment140 json written here."""
    path = write_sent140_leaf(tmp_path / "sent140.json", n_users=40, per_user=10, seed=0)
    out = tmp_path / "out"
    rows, _ = run_script("auc_paper", [
        "--dataset", "sent140", "--data-path", str(path), "--n-train", "60", "--n-val", "60", "--n-test", "60",
        "--hidden", "3", "--fc", "3", "--batch-size", "16", "--steps", "3", *TINY_TEXT,
        "--methods", "stocbio", "accbo", "--out", str(out)], capsys)
    check_rows(rows, ["stocbio", "accbo"], out)
    assert all(" +- " in row["test_auc"] and " +- " in row["train_auc"] for row in rows)


def test_hpo_rnn_paper_end_to_end(rt_path, tmp_path, capsys):
    out = tmp_path / "out"
    rows, _ = run_script("hpo_rnn_paper", [
        "--data-path", rt_path, "--n-train", "40", "--n-val", "40", "--n-test", "40", "--hidden", "3", "--fc", "3",
        "--batch-size", "10", "--steps", "3", *TINY_TEXT, "--methods", "soba", "bo-rep", "--out", str(out)], capsys)
    check_rows(rows, ["soba", "bo-rep"], out)
    table = (out / "table.md").read_text()  # the plain-SGD upper grid is x1000, the normalized one not
    assert re.search(r"\| soba +\| lower_lr=0\.1 upper_lr=100 ", table)
    assert re.search(r"\| bo-rep +\| lower_lr=0\.1 upper_lr=0\.1 ", table)

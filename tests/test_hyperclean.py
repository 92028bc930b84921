"""Tests of the neural data hyper-cleaning problem (problems/hyperclean.py).

Fixture files come from tests/data_fixtures.py (and one hand-written csv whose every row has a
word of its own, to check that the vocabulary sees the training split only).
"""
import csv
import math

import numpy as np
import pytest
import torch

import bilevel
from bilevel import hypergrad, oracles, tree
from bilevel.problems.hyperclean import Hyperclean, detection_scores
from bilevel.registry import make_problem
from test_hyperclean_digits import solve_lower  # damped Newton to machine precision

F64 = torch.float64
TEXT_TINY = dict(hidden=8, embed_dim=8, max_len=12, min_freq=1, batch_size=16, val_batch_size=16)


@pytest.fixture(scope="module")
def files(data_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("hyperclean")
    return {**data_files, "unique-words": str(_write_unique_words(d / "unique.csv"))}


def _write_unique_words(path, n=120):
    """A 2-class csv where row i holds the word "uniq<i>" found in no other row."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(n):
            writer.writerow([f"shared common{i % 2} uniq{i}", i % 2])
    return path


def rt_problem(files, **options):
    settings = dict(dataset="rotten-tomatoes", model="lstm", data_path=files["rotten-tomatoes"],
                    n_train=60, n_val=30, n_test=40, dtype="float64", **TEXT_TINY)
    settings.update(options)
    return Hyperclean(**settings)


def random_x(problem, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"weight_logits": torch.randn(problem.n_train, generator=g, dtype=problem.dtype)}


# -- 1. exact hypergradient against finite differences of Phi (linear model, digits) -----------

def test_exact_hypergradient_matches_finite_differences_of_phi():
    problem = Hyperclean(dataset="digits", model="linear", n_train=50, n_val=30, n_test=30, reg=1e-2,
                               dtype="float64", batch_size=None, val_batch_size=None)
    assert torch.allclose(problem.train_inputs.mean(0), torch.zeros(64, dtype=F64), atol=1e-10)  # train stats
    x = random_x(problem)
    _, y0 = problem.init(torch.Generator().manual_seed(0))
    y_star = solve_lower(problem, x, tree.zeros_like(y0))  # from 0: fewer damped steps than from y0
    exact = hypergrad.exact(problem, x, y_star, None, None)[0]["weight_logits"]

    def phi(logits):
        shifted = {"weight_logits": logits}
        return float(problem.upper_loss(shifted, solve_lower(problem, shifted, y_star), None))

    eps, coords = 1e-4, (0, 11, 29, 48)
    fd = []
    for i in coords:
        e = torch.zeros(problem.n_train, dtype=F64)
        e[i] = eps
        fd.append((phi(x["weight_logits"] + e) - phi(x["weight_logits"] - e)) / (2 * eps))
    fd, ex = torch.tensor(fd, dtype=F64), exact[list(coords)]
    assert float(ex.abs().min()) > 0
    assert float((fd - ex).norm() / ex.norm()) < 1e-5, (fd, ex)


def test_cg_hypergradient_matches_exact_on_the_convex_linear_model():
    problem = Hyperclean(dataset="digits", model="linear", n_train=50, n_val=30, n_test=30, reg=1e-2,
                               dtype="float64", batch_size=None, val_batch_size=None)
    x = random_x(problem)
    _, y0 = problem.init(torch.Generator().manual_seed(0))
    y = solve_lower(problem, x, tree.zeros_like(y0))
    exact = hypergrad.exact(problem, x, y, None, None)[0]
    cg = bilevel.hypergradient(problem, x, y, None, None, method="cg", steps=200)
    assert tree.relative_error(cg, exact) < 1e-8
    few = bilevel.hypergradient(problem, x, y, None, None, method="cg", steps=2)
    assert tree.relative_error(few, exact) > 1e-4  # the comparison can tell a poor solve apart


# -- 2. second-order oracles of the recurrent models -------------------------------------------

def _rel(a, b):
    a, b = tree.flatten(a), tree.flatten(b)
    return float((a - b).norm() / b.norm())


@pytest.mark.filterwarnings("ignore:.*forward-mode AD failed:RuntimeWarning")
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_hvp_and_cross_reverse_forward_and_finite_differences_agree(files, cell):
    """Tolerances: reverse vs forward 1e-9 (same math, rounding only); central differences of
    grad_lower with eps = 1e-5 in float64, 1e-6 (truncation error O(eps^2))."""
    problem = rt_problem(files, model=cell)
    x = random_x(problem)
    _, y = problem.init(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(2)
    v = {k: torch.randn(t.shape, generator=g, dtype=F64) for k, t in y.items()}
    batch = torch.tensor([0, 5, 5, 17, 33, 59, 41, 8])

    hvp_rev = oracles.hvp(problem, x, y, v, batch, mode="reverse")
    cross_rev = oracles.cross(problem, x, y, v, batch, mode="reverse")
    hvp_fwd = oracles.hvp(problem, x, y, v, batch, mode="forward")
    cross_fwd = oracles.cross(problem, x, y, v, batch, mode="forward")
    assert _rel(hvp_fwd, hvp_rev) < 1e-9
    assert _rel(cross_fwd, cross_rev) < 1e-9

    eps = 1e-5
    plus = oracles.grad_lower(problem, x, tree.add(y, tree.scale(v, eps)), batch)
    minus = oracles.grad_lower(problem, x, tree.sub(y, tree.scale(v, eps)), batch)
    fd_cross = tree.scale(tree.sub(plus[0], minus[0]), 1 / (2 * eps))
    fd_hvp = tree.scale(tree.sub(plus[1], minus[1]), 1 / (2 * eps))
    assert _rel(fd_hvp, hvp_rev) < 1e-6
    assert _rel(fd_cross, cross_rev) < 1e-6
    # the cross term touches exactly the weights of the batch
    touched = cross_rev["weight_logits"] != 0
    assert set(touched.nonzero().flatten().tolist()) == set(batch.tolist())


def test_snli_pair_model_has_a_three_way_head(files):
    problem = Hyperclean(dataset="snli", model="gru", data_path=files["snli"], n_train=40, n_val=20,
                               n_test=20, **TEXT_TINY)
    assert problem.train_inputs.dim() == 3 and problem.train_inputs.shape[1] == 2
    x, y = problem.init(torch.Generator().manual_seed(0))
    assert y["head.0.weight"].shape == (TEXT_TINY["hidden"], 4 * TEXT_TINY["hidden"])
    out = problem.logits(y, problem.val_inputs[:5])
    assert out.shape == (5, 3) and problem.n_classes == 3
    assert math.isfinite(float(problem.lower_loss(x, y, problem.sample("lower", torch.Generator()))))


# -- 3. determinism, splits, corruption, train-only vocabulary ---------------------------------

def unique_problem(files, seed=0, **options):
    settings = dict(dataset="table", model="gru", data_path=files["unique-words"], n_train=70, n_val=20, n_test=25,
                    noise_rate=0.3, seed=seed, **TEXT_TINY)
    settings.update(options)
    return Hyperclean(**settings)


def test_seeded_splits_corruption_and_init(files):
    a, b, c = unique_problem(files), unique_problem(files), unique_problem(files, seed=1)
    for name in ("train_indices", "val_indices", "test_indices"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.train_indices, c.train_indices)
    assert torch.equal(a.corrupted_mask, b.corrupted_mask) and torch.equal(a.train_labels_noisy, b.train_labels_noisy)
    assert not torch.equal(a.corrupted_mask, c.corrupted_mask)
    assert torch.equal(a.train_inputs, b.train_inputs) and a.vocab == b.vocab

    _, ya = a.init(torch.Generator().manual_seed(3))
    _, yb = b.init(torch.Generator().manual_seed(3))
    _, yc = a.init(torch.Generator().manual_seed(4))
    assert all(torch.equal(ya[k], yb[k]) for k in ya)
    assert not all(torch.equal(ya[k], yc[k]) for k in ya)

    union = np.concatenate([a.train_indices, a.val_indices, a.test_indices])
    assert len(np.unique(union)) == len(union) == 115

    mask, noisy, clean = a.corrupted_mask, a.train_labels_noisy, a.train_labels_clean
    assert int(mask.sum()) == round(0.3 * 70)
    assert bool((noisy[mask] != clean[mask]).all()) and bool((noisy[~mask] == clean[~mask]).all())
    assert torch.equal(clean, torch.tensor(a.train_indices % 2))  # labels follow the rows


def test_vocabulary_holds_training_words_only(files):
    problem = unique_problem(files)
    vocab = problem.vocab
    assert all(f"uniq{i}" in vocab for i in problem.train_indices)
    assert not any(f"uniq{i}" in vocab for i in np.concatenate([problem.val_indices, problem.test_indices]))
    # a validation sentence encodes its own word as <unk> (index 1)
    assert 1 in problem.val_inputs[0].tolist()


# -- 4. evaluate -------------------------------------------------------------------------------

def test_evaluate_is_pure_and_matches_hand_computation(files):
    problem = rt_problem(files, noise_rate=0.4)
    problem.eval_chunk = 7  # several chunks, the last one short
    x = random_x(problem)
    _, y = problem.init(torch.Generator().manual_seed(5))
    x_before, y_before = tree.clone(x), tree.clone(y)
    metrics = problem.evaluate(x, y)
    assert all(torch.equal(x[k], x_before[k]) for k in x) and all(torch.equal(y[k], y_before[k]) for k in y)

    with torch.no_grad():
        predictions = problem.net(y, problem.test_inputs).argmax(dim=1)  # untrimmed, one pass
    hand = sum(int(p) == int(t) for p, t in zip(predictions, problem.test_labels)) / problem.n_test
    assert metrics["test_accuracy"] == pytest.approx(hand, abs=1e-12)
    assert metrics["val_loss"] == pytest.approx(float(problem.upper_loss(x, y, None)), rel=1e-10)

    flagged = torch.sigmoid(x["weight_logits"]) < 0.5
    corrupted = problem.corrupted_mask
    tp, fp, fn = int((flagged & corrupted).sum()), int((flagged & ~corrupted).sum()), int((~flagged & corrupted).sum())
    assert tp > 0 and fp > 0 and fn > 0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert metrics["precision"] == pytest.approx(precision) and metrics["recall"] == pytest.approx(recall)
    assert metrics["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert detection_scores(torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool))["f1"] == 0.0


# -- 5. a few solver steps learn on every fixture format ---------------------------------------

LEARN = {
    "rotten-tomatoes-lstm": dict(dataset="rotten-tomatoes", model="lstm", n_train=200, n_val=100, n_test=100, steps=100),
    "rotten-tomatoes-rnn": dict(dataset="rotten-tomatoes", model="rnn", n_train=200, n_val=100, n_test=100, steps=200),
    "rotten-tomatoes-gru-2-layers": dict(dataset="rotten-tomatoes", model="gru", layers=2, n_train=200, n_val=100,
                                         n_test=100, steps=100),
    "mnist-5k-mlp": dict(dataset="mnist-5k", model="mlp", n_train=150, n_val=60, n_test=90, steps=60),
    "mnist-5k-linear": dict(dataset="mnist-5k", model="linear", n_train=150, n_val=60, n_test=90, steps=60),
    "sent140-gru": dict(dataset="sent140", model="gru", n_train=100, n_val=50, n_test=50, steps=100),
    "snli-lstm": dict(dataset="snli", model="lstm", n_train=120, n_val=60, n_test=60, steps=60),
    "table-gru": dict(dataset="table", model="gru", n_train=180, n_val=60, n_test=120, label_column="coarse_label",
                      steps=100),
}


@pytest.mark.parametrize("case", sorted(LEARN))
def test_soba_raises_test_accuracy_on_fixture_data(files, case):
    """SOBA with upper_lr 10, lower_lr 2, z_lr 0.1 at noise_rate 0.2 (at 0.4, 200 binary samples
    hold too little signal for a text model learned from scratch in 100 steps)."""
    options = dict(LEARN[case])
    steps, dataset = options.pop("steps"), options.pop("dataset")
    problem = Hyperclean(dataset=dataset, data_path=files[dataset], noise_rate=0.2, hidden=16, embed_dim=16,
                               max_len=20, min_freq=1, batch_size=32, val_batch_size=32, **options)
    result = bilevel.solve(problem, "soba", steps=steps, seed=0, eval_every=steps,
                           upper_lr=10.0, lower_lr=2.0, z_lr=0.1)
    before, after = result.history[0]["test_accuracy"], result.history[-1]["test_accuracy"]
    majority = float(torch.bincount(problem.test_labels).max()) / problem.n_test
    assert after >= before + 0.15 and after >= majority + 0.05, (before, after, majority)


def test_tiny_preset_builds_through_the_registry(files):
    problem = make_problem("hyperclean", preset="tiny", data_path=files["rotten-tomatoes"])
    assert isinstance(problem, Hyperclean) and problem.n_train == 150 and problem.model == "rnn"
    assert problem.n_samples("lower") == 150 and problem.n_samples("upper") == 70
    batch = problem.sample("lower", torch.Generator().manual_seed(0))
    assert batch.dtype == torch.long and batch.shape[0] in (32, 150 % 32) and int(batch.max()) < 150  # a block
    assert set(Hyperclean.PRESETS) >= {"tiny", "paper"}


# -- 6. errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("options, pattern", [
    (dict(dataset="imdb"), "dataset"),
    (dict(model="transformer"), "model"),
    (dict(dataset="digits", model="lstm"), "model 'lstm'.*digits"),
    (dict(model="mlp"), "model 'mlp'.*rotten-tomatoes"),
    (dict(n_train=300, n_val=100, n_test=100), "exceeds"),
    (dict(dataset="sent140", data_path=None), "data_path"),
    (dict(dataset="table", data_path=None), "data_path"),
    (dict(noise_rate=1.0), "noise_rate"),
    (dict(noise_rate=-0.1), "noise_rate"),
    (dict(layers=3), "layers"),
    (dict(reg=0.0), "reg"),
    (dict(batch_size=0), "batch_size"),
    (dict(dtype="float16"), "dtype"),
    (dict(n_val=1.5), "n_val"),
])
def test_invalid_options_raise_naming_the_problem(files, options, pattern):
    settings = dict(dataset="rotten-tomatoes", model="lstm", data_path=files["rotten-tomatoes"], n_train=50,
                    n_val=20, n_test=20)
    settings.update(options)
    with pytest.raises(ValueError, match=pattern):
        Hyperclean(**settings)

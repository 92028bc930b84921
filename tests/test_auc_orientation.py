"""Orientation checks of the deep AUC problem (problems/auc.py): the AUC-M loss, minimized with the
problem's own classifier, raises the training AUC on separable data; the AUC metrics are
sklearn's on the problem's scores; and the bilevel form's value function splits as

    Phi(x) = L_val(x, alpha*_tr(x)) = max_alpha L_val(x, alpha) - p (1-p) (alpha*_tr(x) - alpha*_val(x))^2,

the identity behind the train AUC below 0.5 of experiments/README.md (section "Deep AUC
maximization"): minimizing Phi rewards a train margin alpha*_tr far from the validation margin.
"""
import csv

import numpy as np
import pytest
import torch

import bilevel
from bilevel import oracles
from bilevel.problems.auc import DeepAUC, auc_margin_loss

FILLER = ("the", "a", "movie", "film", "story", "it", "was", "and", "of", "with", "plot", "scene")
POSITIVE = ("great", "superb", "fun", "best")
NEGATIVE = ("awful", "dull", "worst", "mess")


def write_separable(path, n=500, seed=0):
    """Every positive review holds one POSITIVE word and no NEGATIVE one, and conversely: a
    separable binary table (58% positives, like Rotten Tomatoes' offline copy)."""
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(n):
            label = int(rng.random() < 0.58)
            words = list(rng.choice(FILLER, size=5)) + [str(rng.choice(POSITIVE if label else NEGATIVE))]
            rng.shuffle(words)
            writer.writerow([" ".join(words), label])
    return str(path)


def settings(path):
    return dict(dataset="table", data_path=path, n_train=100, n_val=100, n_test=100, positive_ratio=0.8,
                cell="rnn", hidden=8, embed_dim=8, fc=8, max_len=8, max_vocab=40, batch_size=32,
                val_batch_size=32, seed=0)


@pytest.fixture(scope="module")
def separable_path(tmp_path_factory):
    return write_separable(tmp_path_factory.mktemp("auc_orientation") / "separable.csv")


@pytest.fixture(scope="module")
def separable(separable_path):
    return DeepAUC(**settings(separable_path))


def alpha_star_on(problem, x, split):
    """argmax_alpha L(x, alpha) on a whole split (closed form of problems/auc.py)."""
    h = problem.scores(x, getattr(problem.data, f"{split}_tokens"))
    pos = (getattr(problem.data, f"{split}_labels") == 1).to(h.dtype)
    p = problem.p
    return problem.margin + (p * h * (1 - pos) - (1 - p) * h * pos).mean() / (p * (1 - p))


def test_auc_metrics_are_sklearns_on_the_problems_scores(separable):
    from sklearn.metrics import roc_auc_score
    x, y = separable.init(torch.Generator().manual_seed(3))
    metrics = separable.evaluate(x, y)
    for split in ("train", "val", "test"):
        with torch.no_grad():
            scores = separable.scores(x, getattr(separable.data, f"{split}_tokens")).numpy()
        labels = getattr(separable.data, f"{split}_labels").numpy()
        assert metrics[f"{split}_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
        # positives are label 1: negated scores give 1 - AUC
        assert 1 - metrics[f"{split}_auc"] == pytest.approx(roc_auc_score(labels, -scores), abs=1e-6)
    with torch.no_grad():
        assert metrics["alpha_star_val"] == pytest.approx(float(alpha_star_on(separable, x, "val")), rel=1e-6)
        assert metrics["alpha_star"] == pytest.approx(float(alpha_star_on(separable, x, "train")), rel=1e-6)
    # the labels the loss sees are the ones the metric sees: positive rate 0.8 on train and val
    assert float(separable.data.train_labels.float().mean()) == pytest.approx(0.8)
    assert separable.p == pytest.approx(0.8)


def test_lower_only_fits_alpha_and_leaves_the_auc(separable):
    result = bilevel.solve(separable, "lower-only", steps=200, seed=0, eval_every=200, lower_lr=1.0)
    first, last = result.history[0], result.history[-1]
    assert last["train_auc"] == first["train_auc"]  # the classifier is x: lower-only never moves it
    # alpha from 0 to the (full-split) closed form, up to the noise of 32-sample batches
    assert first["alpha"] == 0 and abs(last["alpha"] - last["alpha_star"]) < 0.1 < last["alpha_star"]


def test_minimizing_the_auc_m_loss_raises_train_auc(separable):
    """Descent in (w, a, b), ascent in alpha on L over the training split (the min-max AUC-M
    problem itself, Yuan et al. 2021): train AUC from chance to ~1 on separable data."""
    x, y = separable.init(torch.Generator().manual_seed(0))
    start = separable.evaluate(x, y)
    for _ in range(300):
        # g = -L_train: x descends L (ascends g), alpha ascends L (descends g)
        gx, gy = oracles.grad_lower(separable, x, y, None)
        x = {k: v + 0.5 * gx[k] for k, v in x.items()}
        y = {"alpha": y["alpha"] - 0.5 * gy["alpha"]}
    end = separable.evaluate(x, y)
    assert start["train_auc"] < 0.8
    assert end["train_auc"] > 0.97 and end["test_auc"] > 0.9, (start, end)
    assert end["alpha_star"] < start["alpha_star"]  # the train margin gap E[h|neg] - E[h|pos] falls


class SameSplit(DeepAUC):
    """Control: the lower level reads the validation split as well, so Phi(x) = max_alpha L_val(x, alpha)
    (no gap term) and the training split is held out."""

    def lower_loss(self, x, y, batch):
        return -self._loss(x, y["alpha"], self.data.val_tokens, self.data.val_labels, batch)


SOBA = dict(upper_lr=0.5, lower_lr=0.5, z_lr=0.5)


def test_soba_raises_train_auc_on_separable_data(separable):
    result = bilevel.solve(separable, "soba", steps=200, seed=0, eval_every=200, **SOBA)
    first, last = result.history[0], result.history[-1]
    assert first["train_auc"] < 0.65 and first["val_auc"] < 0.6
    assert last["val_auc"] > 0.95 and last["train_auc"] > 0.8 and last["alpha_star"] < 0.6, (first, last)


@pytest.mark.slow
def test_soba_pushes_the_train_margin_away_once_validation_is_fitted(separable, separable_path):
    """The gap term at work (measured: train AUC 0.60 -> 0.86 at step 200 -> 0.70 at step 600
    while val AUC -> 1.00; alpha*_tr 1.00 -> 0.42 -> 0.90, alpha*_val -> 0.02). The control with
    alpha fitted on validation keeps the held-out train AUC at 0.93."""
    history = bilevel.solve(separable, "soba", steps=600, seed=0, eval_every=200, **SOBA).history
    train = [h["train_auc"] for h in history]
    assert history[-1]["val_auc"] > 0.99
    assert train[1] > train[0] + 0.15 and train[-1] < train[1] - 0.1, train
    assert history[-1]["alpha_star"] > history[1]["alpha_star"] + 0.3
    kept = bilevel.solve(SameSplit(**settings(separable_path)), "soba", steps=600, seed=0, eval_every=600, **SOBA).history[-1]
    assert kept["val_auc"] > 0.99 and kept["train_auc"] > history[-1]["train_auc"] + 0.15


def test_value_function_rewards_a_train_margin_away_from_the_validation_one(separable):
    """L is concave quadratic in alpha with curvature -2 p (1-p), so
    L_val(x, alpha*_tr) = L_val(x, alpha*_val) - p (1-p) (alpha*_tr - alpha*_val)^2 exactly."""
    x, _ = separable.init(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(10)
    x = {k: v + 2.0 * torch.randn(v.shape, generator=g) for k, v in x.items()}
    q = separable.p * (1 - separable.p)
    with torch.no_grad():
        star_tr = separable.alpha_star(x, None)
        star_val = alpha_star_on(separable, x, "val")
        phi = separable.upper_loss(x, {"alpha": star_tr}, None)
        best = separable.upper_loss(x, {"alpha": star_val}, None)
    assert float(star_tr) == pytest.approx(float(alpha_star_on(separable, x, "train")), rel=1e-6)
    assert abs(float(star_tr - star_val)) > 0.1  # a point with a gap (1.04 against 0.88)
    assert float(phi) == pytest.approx(float(best - q * (star_tr - star_val) ** 2), rel=1e-5)
    # alpha*_val maximizes L_val
    for shift in (-0.3, 0.2):
        assert float(separable.upper_loss(x, {"alpha": star_val + shift}, None)) < float(best)


def test_alpha_star_is_the_mean_score_gap_on_balanced_means():
    """alpha* = m + E[h | neg] - E[h | pos] when p is the batch's positive rate: a train AUC
    below 0.5 on mean scores is alpha*_tr > m."""
    h = torch.tensor([0.9, 0.7, 0.2, 0.4, 0.1], dtype=torch.float64)
    labels = torch.tensor([1, 1, 0, 0, 1])
    p, m = 0.6, 1.0
    alpha = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    zero = torch.tensor(0.0, dtype=torch.float64)
    (d,) = torch.autograd.grad(auc_margin_loss(h, labels, zero, zero, alpha, p, m), alpha)
    star = float(d) / (2 * p * (1 - p))  # L is -p(1-p) alpha^2 + 2 alpha c + ...: argmax c / (p (1-p))
    assert star == pytest.approx(m + (0.2 + 0.4) / 2 - (0.9 + 0.7 + 0.1) / 3, rel=1e-12)

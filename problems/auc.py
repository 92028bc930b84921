"""Deep AUC maximization of a recurrent text classifier on imbalanced data (AccBO's experiment).

The AUC-margin (AUC-M) min-max loss of Yuan, Yan, Sonka, Yang (ICCV 2021; LibAUC), as written
in AccBO's code (Gong, Hao, Liu, NeurIPS 2024, ``auc_maximization/aucloss.py`` in
github.com/MingruiLiu-ML-Lab/Accelerated-Bilevel-Optimization-Unbounded-Smoothness). With the score h = sigmoid(s(w; text)) of a recurrent classifier with one output
s, labels c in {0, 1}, the positive rate p and the margin m, over a batch B:

    L(w, a, b, alpha; B) = (1-p) mean_B((h - a)^2 1[c=1]) + p mean_B((h - b)^2 1[c=0])
                           + 2 (alpha + 1) (p (1-p) m + mean_B(p h 1[c=0] - (1-p) h 1[c=1]))
                           - p (1-p) alpha^2

Every mean runs over the whole batch (the indicator is inside), so L is the mean of per-sample
losses (a finite sum; index batches work with SABA-style memories). Bilevel form:

    x = {the classifier's parameters w, "a", "b"},     y = {"alpha": 0-d tensor}
    f(x, y; B) =  L(w, a, b, alpha; B)    B a validation batch (upper level)
    g(x, y; B) = -L(w, a, b, alpha; B)    B a training batch   (lower level)

g is a quadratic in alpha with d2 g / d alpha^2 = 2 p (1-p) > 0 (strongly convex, modulus
2 p (1-p)) and the closed-form minimizer

    alpha*(x; B) = m + mean_B(p h 1[c=0] - (1-p) h 1[c=1]) / (p (1-p))   (see :meth:`alpha_star`).

LibAUC projects alpha onto alpha >= 0; the bilevel form here (as in AccBO) leaves it free.

What the bilevel form optimizes. L is a concave quadratic in alpha (curvature -2 p (1-p)), so
with alpha*_tr = alpha*(x; train) and alpha*_val the same closed form on the validation split,

    Phi(x) = L_val(x, alpha*_tr(x)) = max_alpha L_val(x, alpha) - p (1-p) (alpha*_tr(x) - alpha*_val(x))^2.

The classifier is an upper variable, fitted on validation (the first term, the AUC-M min-max on
validation); the training split reaches it only through the second term, which *rewards* a
training margin alpha*_tr = m + E_tr[h | neg] - E_tr[h | pos] (for batch means at the split's
positive rate) away from the validation one. Once validation is fitted (alpha*_val < m), that
term pushes the training AUC down: a property of AccBO's formulation, not of this code. It shows on
small separable data; on real text at small sizes the training split simply behaves as held-out
data (experiments/README.md, "Deep AUC maximization", has the measurements).

p is the positive rate of the *training split*, fixed at construction (exact, since the split is
built with an exact count of positives). AccBO freezes p to the positive rate of the first batch
the loss ever sees, a random number near the split's rate.

Data: ``rotten-tomatoes`` (offline, the default), ``sent140`` (a LEAF json file) or ``table``
(a csv / json / parquet file) from ``data_path``; labels must be binary (1 = positive). One seeded
permutation gives a test split of ``n_test`` samples at the corpus's natural positive rate; the
train and validation splits are then drawn from the rest with exactly round(positive_ratio * n)
positives and n - round(positive_ratio * n) negatives each (``n_train``, ``n_val`` are the sizes
*after* this imbalancing; with rotten-tomatoes' 58% positives the default 0.8 drops negatives).
AccBO keeps the first 1000 Sent140 negatives and 4000 positives, splits them 50/50 at random
into train and validation (so each split's ratio is only near 0.8) and tests on the full
Sent140 test split; here the test split comes from the same file.

Metrics (:meth:`evaluate`): ``test_auc`` is the global ROC AUC over the whole test split
(``sklearn.metrics.roc_auc_score``); ``test_auc_batch_mean`` is the official metric: the AUC of
each run of 32 consecutive test samples, a single-class batch counting 0.5, averaged over the
batches (the last batch may be shorter).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from bilevel.registry import register_problem
from bilevel.tree import Tree

from .digits import split_indices
from .batches import sampling_option, select
from .options import check_int, check_real
from .text_classifier import (TextClassifierProblem, batch_tokens, build_classifier, check_common_options,
                              check_model_options, encode_splits, load_text, predict)
from .runs import default_run

NAME = "auc"
DATASETS = ("rotten-tomatoes", "sent140", "table")
#: Size of the consecutive test batches of the official batch-averaged AUC.
AUC_BATCH = 32
#: Keys of x that are not classifier parameters.
SCALARS = ("a", "b")


def auc_margin_loss(h: Tensor, labels: Tensor, a: Tensor, b: Tensor, alpha: Tensor, p: float,
                    margin: float) -> Tensor:
    """L(w, a, b, alpha; B) of the module docstring for scores ``h`` in (0, 1) and labels in {0, 1}."""
    pos = (labels == 1).to(h.dtype)
    neg = 1.0 - pos
    q = p * (1.0 - p)
    coupling = q * margin + (p * h * neg - (1.0 - p) * h * pos).mean()
    # 2 (alpha + 1) coupling, written without "0-d tensor + Python float": torch 2.13's forward-mode
    # AD gives such a sum a float64 tangent, which breaks the forward-over-reverse products.
    return ((1.0 - p) * ((h - a).square() * pos).mean() + p * ((h - b).square() * neg).mean()
            + 2.0 * (alpha * coupling + coupling) - q * alpha.square())


def batch_mean_auc(labels: np.ndarray, scores: np.ndarray, batch: int = AUC_BATCH) -> float:
    """Mean over consecutive batches of ``batch`` samples of each batch's ROC AUC, a batch with a
    single class counting 0.5 (AccBO's ``aucloss.py`` metric)."""
    from sklearn.metrics import roc_auc_score
    values = []
    for start in range(0, len(labels), batch):
        lab, sc = labels[start:start + batch], scores[start:start + batch]
        values.append(0.5 if len(np.unique(lab)) < 2 else float(roc_auc_score(lab, sc)))
    return float(np.mean(values))


def imbalanced_splits(labels: np.ndarray, n_train: int, n_val: int, n_test: int,
                      positive_ratio: Optional[float], seed: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) index arrays: test = the first ``n_test`` samples of a seeded
    permutation (natural ratio); train and val take, from the rest and in permutation order,
    exactly round(positive_ratio * n) positives and the complement of negatives each, in a seeded
    random order (the next ``n_train`` / ``n_val`` samples when ``positive_ratio`` is None)."""
    n = len(labels)
    if n_test >= n:
        raise ValueError(f"{NAME}: n_test = {n_test} leaves no samples for train and val (the corpus has {n})")
    test, rest, _ = split_indices(n, (n_test, n - n_test, 0), seed)
    if positive_ratio is None:
        if n_train + n_val > len(rest):
            raise ValueError(f"{NAME}: n_train + n_val + n_test = {n_train + n_val + n_test} exceed the "
                             f"{n} samples of the corpus")
        return rest[:n_train], rest[n_train:n_train + n_val], test
    counts = [(int(round(positive_ratio * size)), size) for size in (n_train, n_val)]
    for option, (n_pos, size) in zip(("n_train", "n_val"), counts):
        if not 0 < n_pos < size:
            raise ValueError(f"{NAME}: positive_ratio = {positive_ratio} leaves {n_pos} positives among "
                             f"{option} = {size} samples; both classes must be present")
    pos_at, neg_at = np.flatnonzero(labels[rest] == 1), np.flatnonzero(labels[rest] != 1)
    need_pos, need_neg = sum(c[0] for c in counts), sum(c[1] - c[0] for c in counts)
    if need_pos > len(pos_at) or need_neg > len(neg_at):
        raise ValueError(f"{NAME}: train and val need {need_pos} positives and {need_neg} negatives "
                         f"(positive_ratio = {positive_ratio}), the corpus has {len(pos_at)} and "
                         f"{len(neg_at)} outside the test split; lower n_train / n_val")
    (p_tr, s_tr), (p_va, s_va) = counts
    train = np.concatenate([pos_at[:p_tr], neg_at[:s_tr - p_tr]])
    val = np.concatenate([pos_at[p_tr:p_tr + p_va], neg_at[s_tr - p_tr:s_tr - p_tr + s_va - p_va]])
    # A seeded shuffle, not a sort: the picks come class by class, and sorted positions would leave
    # the classes in long runs, so that the consecutive blocks of problems/batches.py were single-class.
    shuffle = np.random.Generator(np.random.PCG64([seed, 2]))
    return rest[shuffle.permutation(train)], rest[shuffle.permutation(val)], test


@register_problem(NAME, paper="Gong, Hao, Liu, An Accelerated Algorithm for Stochastic Bilevel Optimization "
                  "under Unbounded Smoothness, NeurIPS 2024 (deep AUC maximization); AUC-M loss of Yuan et "
                  "al., ICCV 2021 (LibAUC)")
class DeepAUC(TextClassifierProblem):
    """Deep AUC maximization: a recurrent text classifier and (a, b) against the AUC-M dual alpha.

    Attributes: ``model`` (FunctionalModel, one output), ``data`` (TextSplits), ``p`` (train
    positive rate), ``margin``, ``n_train``, ``n_val``, ``n_test``.
    """

    name = NAME
    headline_metrics = ("test_auc", "test_auc_batch_mean")
    #: grid-point choice (bilevel.report.selection): ROC AUC on the whole validation split.
    selection = ("val_auc", "max", "test_auc")

    PRESETS: Dict[str, Dict[str, Any]] = {
        # Seconds on 2 CPU cores.
        "tiny": dict(n_train=200, n_val=200, n_test=200, cell="rnn", hidden=16, embed_dim=16, fc=16,
                     max_len=24, max_vocab=2000, batch_size=32, val_batch_size=32),
        # AccBO: Sent140, 1000 negatives + 4000 positives split 50/50 (2500 / 2500, ratio 0.8),
        # 2-layer 4096-unit Elman RNN on frozen-vocabulary GloVe 300d, fc 1024, batch 32, full
        # Sent140 test split. Here (reduced to one CPU): rotten-tomatoes offline (pass
        # dataset="sent140" and data_path for the real data), the same split sizes and ratio,
        # 1-layer 256-unit RNN, fc 128, learned 100-d embeddings (glove_path for GloVe), a
        # 2000-sample natural-ratio test split of the same corpus.
        "paper": dict(dataset="rotten-tomatoes", n_train=2500, n_val=2500, n_test=2000, positive_ratio=0.8,
                      cell="rnn", layers=1, hidden=256, embed_dim=100, fc=128, max_len=48,
                      max_vocab=20000, batch_size=32, val_batch_size=32),
    }

    #: Default run of ``bilevel run problem=auc preset=tiny`` (bilevel.config.default_run): 60
    #: steps, 2 inner and 3 Neumann / CG steps, neumann_lr 0.1 (no power iteration), normalized
    #: step length 0.01. A smoke run: on 200 training reviews the tiny RNN barely learns.
    #: Measured (seed 0, real Rotten Tomatoes): test AUC 0.528 (lower-only, which only fits
    #: alpha) -> 0.542-0.551.
    RUNS = {
        "tiny": default_run(steps=60, eval_every=20, solver_options={
            "lower-only": dict(lower_lr=0.1),
            "soba": dict(upper_lr=dict(value=0.1, decay=0.5), lower_lr=dict(value=0.1, decay=0.5),
                         z_lr=dict(value=0.1, decay=0.5)),
            "stocbio": dict(upper_lr=0.1, lower_lr=0.1, inner_steps=2, neumann_steps=3, neumann_lr=0.1),
            "aid-cg": dict(upper_lr=0.1, lower_lr=0.1, inner_steps=2, cg_steps=3),
            "bo-rep": dict(upper_lr=0.01, lower_lr=0.1, neumann_steps=3, neumann_lr=0.1),
            "slip": dict(upper_lr=0.01, lower_lr=0.1, neumann_steps=3, neumann_lr=0.1)}),
    }

    def __init__(self, dataset: str = "rotten-tomatoes", data_path: Optional[str] = None,
                 text_column: str = "text", label_column: str = "label", cell: str = "rnn", layers: int = 1,
                 hidden: int = 64, embed_dim: int = 64, fc: int = 64, max_len: int = 48, min_freq: int = 1,
                 max_vocab: Optional[int] = 20000, glove_path: Optional[str] = None, n_train: int = 1000,
                 n_val: int = 1000, n_test: int = 1000, positive_ratio: Optional[float] = 0.8,
                 margin: float = 1.0, batch_size: Optional[int] = 32, val_batch_size: Optional[int] = 32,
                 seed: int = 0, dtype: str = "float32", sampling: str = "blocks"):
        """
        Args:
            dataset: "rotten-tomatoes" (offline), "sent140" or "table" (``data_path`` needed).
            data_path: the user file (or another copy of the offline file).
            text_column, label_column: columns of a "table" file (labels 0 / 1).
            cell: "rnn" (official), "lstm" or "gru"; layers: 1 or 2; hidden: units per layer.
            embed_dim: learned embedding width (GloVe's width with ``glove_path``).
            fc: width of the two tanh layers of the head (0: a linear head).
            max_len, min_freq, max_vocab: truncation and the train-only vocabulary.
            glove_path: a GloVe text file to initialise the embeddings (optional).
            n_train, n_val: split sizes after imbalancing; n_test: natural-ratio test size.
            positive_ratio: exact positive fraction of train and val, in (0, 1); None keeps the
                corpus's ratio.
            margin: m > 0 of the AUC-M loss.
            sampling: "blocks" (default): fixed blocks of consecutive split indices, in a fresh
                order every epoch; "replacement": i.i.d. uniform indices (problems/batches.py).
            batch_size, val_batch_size: index batches of train (lower) and val (upper);
                None for the whole split.
            seed: seed of the splits (the model initialisation comes from the solver's generator).
            dtype: "float32", "float64", or "bfloat16" (float32 variables, the network under
                bf16 autocast: mixed precision).
        """
        check_model_options(NAME, cell, layers, hidden, embed_dim, fc, max_len, min_freq, max_vocab)
        for option, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            check_int(NAME, option, value, minimum=2 if option != "n_test" else 1)
        if positive_ratio is not None:
            check_real(NAME, "positive_ratio", positive_ratio, 0.0, 1.0, rule="a number in (0, 1) or None")
        check_real(NAME, "margin", margin, 0.0, rule="a positive number")
        dtype, self.autocast = check_common_options(NAME, batch_size, val_batch_size, seed, dtype)
        corpus = load_text(NAME, dataset, DATASETS, data_path, text_column, label_column)
        if corpus.n_classes != 2:
            raise ValueError(f"{NAME}: AUC needs binary labels 0 / 1; dataset {dataset!r} has "
                             f"{corpus.n_classes} classes")

        self.dataset, self.margin, self.positive_ratio = dataset, float(margin), positive_ratio
        self.n_train, self.n_val, self.n_test = int(n_train), int(n_val), int(n_test)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.sampling = sampling_option(NAME, sampling)
        self.seed, self.dtype = int(seed), dtype
        splits = imbalanced_splits(corpus.labels, self.n_train, self.n_val, self.n_test, positive_ratio, self.seed)
        self.split_indices = splits  # (train, val, test) indices into the corpus
        self.data = encode_splits(corpus, splits, max_len, min_freq, max_vocab, glove_path, self.seed)
        self.p = float(self.data.train_labels.double().mean())
        if not 0.0 < self.p < 1.0:
            raise ValueError(f"{NAME}: the training split holds a single class (positive rate {self.p})")
        self.model = build_classifier(len(self.data.vocab), 1, cell, layers, hidden, embed_dim, fc,
                                      self.data.embeddings, self.dtype, self.autocast)

    # -- the loss ------------------------------------------------------------------------------

    def scores(self, x: Tree, tokens: Tensor) -> Tensor:
        """h = sigmoid(s) for each row of ``tokens`` (the classifier's single output s)."""
        params = {k: v for k, v in x.items() if k not in SCALARS}
        return torch.sigmoid(self.model(params, tokens)[:, 0])

    def _loss(self, x: Tree, alpha: Tensor, tokens: Tensor, labels: Tensor, batch: Optional[Tensor]) -> Tensor:
        h = self.scores(x, batch_tokens(tokens, batch))
        return auc_margin_loss(h, select(labels, batch), x["a"], x["b"], alpha, self.p, self.margin)

    def upper_loss(self, x: Tree, y: Tree, batch: Optional[Tensor]) -> Tensor:
        """f = L on the validation rows ``batch`` (None: all)."""
        return self._loss(x, y["alpha"], self.data.val_tokens, self.data.val_labels, batch)

    def lower_loss(self, x: Tree, y: Tree, batch: Optional[Tensor]) -> Tensor:
        """g = -L on the training rows ``batch`` (None: all); 2 p (1-p)-strongly convex in alpha."""
        return -self._loss(x, y["alpha"], self.data.train_tokens, self.data.train_labels, batch)

    def alpha_star(self, x: Tree, batch: Optional[Tensor]) -> Tensor:
        """argmin_alpha g(x, alpha; batch) = m + mean(p h 1[c=0] - (1-p) h 1[c=1]) / (p (1-p)),
        batch indexing the training split; differentiable in x."""
        h = self.scores(x, batch_tokens(self.data.train_tokens, batch))
        return self._alpha_star_of(h, select(self.data.train_labels, batch))

    def _alpha_star_of(self, h: Tensor, labels: Tensor) -> Tensor:
        """argmax_alpha L = m + mean(p h 1[c=0] - (1-p) h 1[c=1]) / (p (1-p)) for scores ``h``."""
        pos = (labels == 1).to(h.dtype)
        p = self.p
        return self.margin + (p * h * (1.0 - pos) - (1.0 - p) * h * pos).mean() / (p * (1.0 - p))

    # -- the protocol --------------------------------------------------------------------------

    def init(self, generator: torch.Generator):
        """x0: the model's default initialisation (from ``generator``), a = b = 0; alpha0 = 0
        (LibAUC's zeros)."""
        zero = torch.zeros((), dtype=self.dtype, device=generator.device)
        x = {**self.model.init(generator), "a": zero.clone(), "b": zero.clone()}
        return x, {"alpha": zero.clone()}

    def evaluate(self, x: Tree, y: Tree) -> Dict[str, float]:
        """test_auc (global), test_auc_batch_mean (official), val_auc and train_auc (global ROC
        AUC of the validation and training splits; AccBO's figure draws the train AUC), val_loss
        (f on all of val), alpha, alpha_star (closed form on all of train), alpha_star_val (the
        same on all of val: Phi = max_alpha L_val - p (1-p) (alpha_star - alpha_star_val)^2), a, b."""
        from sklearn.metrics import roc_auc_score
        x = {k: v.detach() for k, v in x.items()}
        params = {k: v for k, v in x.items() if k not in SCALARS}

        def scores_labels(split):
            tokens = getattr(self.data, f"{split}_tokens")
            scores = torch.sigmoid(predict(lambda t: self.model(params, t)[:, 0], tokens)).cpu().numpy()
            return scores, getattr(self.data, f"{split}_labels").cpu().numpy()

        def auc(scores, labels):
            return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")

        scores, labels = scores_labels("test")
        val_scores, val_labels = scores_labels("val")
        with torch.no_grad():
            val_loss = float(self.upper_loss(x, {"alpha": y["alpha"].detach()}, None))
            alpha_star = float(self.alpha_star(x, None))
            alpha_star_val = float(self._alpha_star_of(torch.from_numpy(val_scores).double(),
                                                       torch.from_numpy(val_labels)))
        return {
            "test_auc": auc(scores, labels),
            "test_auc_batch_mean": batch_mean_auc(labels, scores),
            "val_auc": auc(val_scores, val_labels),
            "train_auc": auc(*scores_labels("train")),
            "val_loss": val_loss,
            "alpha": float(y["alpha"]),
            "alpha_star": alpha_star,
            "alpha_star_val": alpha_star_val,
            "a": float(x["a"]),
            "b": float(x["b"]),
        }

"""Data hyper-cleaning on the digits data set (Franceschi et al., ICML 2017).

A fraction of the training labels is replaced by wrong ones. The upper level learns one weight
per training sample so that a classifier trained on the re-weighted noisy set does well on a
clean validation set; corrupted samples should end up with small weights.

Variables:

    x = weight_logits in R^n                  (sample weights sigma(x_i), n = n_train)
    y = (W in R^{64 x 10}, b in R^10)          (multinomial logistic regression, logits a W + b)

Losses, with CE(y; a, c) = -log softmax(a W + b)_c, noisy training pairs (a_i, c~_i), clean
validation pairs (a'_j, c'_j), and B a multiset of indices (the whole split when batch=None):

    g(x, y; B) = 1/|B| sum_{i in B} sigma(x_i) CE(y; a_i, c~_i) + reg (||W||_F^2 + ||b||^2)
    f(x, y; B) = 1/|B| sum_{j in B} CE(y; a'_j, c'_j)

g is (2 reg)-strongly convex in y; f does not depend on x, so grad Phi(x) comes entirely from
the implicit term -d2_xy g . v.

Reference: L. Franceschi, M. Donini, P. Frasconi, M. Pontil, "Forward and Reverse Gradient-Based
Hyperparameter Optimization", ICML 2017, section 5.1 (data hyper-cleaning).
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel.registry import register_problem
from bilevel.tree import Tree

from .batches import sampling_option
from .digits import N_CLASSES, N_SAMPLES, corrupt_labels, load_digits_arrays, split_indices, standardize
from .linear_classifier import LinearClassifierProblem, accuracy, logits, select
from .cleaning import check_cleaning_options, detection_auc, detection_scores
from .options import check_dtype, check_int
from .runs import default_run

NAME = "hyperclean-digits"


@register_problem(NAME, paper="Franceschi et al., Forward and Reverse Gradient-Based "
                  "Hyperparameter Optimization, ICML 2017 (data hyper-cleaning)")
class HypercleanDigits(LinearClassifierProblem):
    """Data hyper-cleaning: per-sample weights of a noisy digits training set, tuned on clean data.

    Attributes: ``train_features``, ``train_labels_noisy``, ``train_labels_clean``,
    ``corrupted_mask`` (bool, over train), ``val_features``, ``val_labels``, ``test_features``,
    ``test_labels``, ``n_classes``, ``n_features``.
    """

    name = NAME
    headline_metrics = ("test_accuracy", "f1")
    #: grid search (bilevel.report.best_rows): the point with the lowest mean val_loss, then its test_accuracy
    selection = ("val_loss", "min", "test_accuracy")
    n_classes = N_CLASSES

    #: "tiny": seconds, for tests; "paper": the main job's setting (Franceschi et al. use MNIST with
    #: 5000 train / 5000 val samples; digits has 1797 samples in all).
    PRESETS = {
        "tiny": {"n_train": 200, "n_val": 100, "n_test": 200, "batch_size": 32, "val_batch_size": 32},
        "paper": {"n_train": 1000, "n_val": 300, "n_test": 497, "noise_rate": 0.5},
    }

    #: Default run of ``bilevel run preset=tiny`` (bilevel.config.default_run): the main job's
    #: solvers for 200 steps; upper_lr 10 instead of the main job's 50 because the hypergradient
    #: entries scale as 1/n_train (200 here, 1000 there). Measured (seed 0): test accuracy 0.46
    #: (lower-only) -> 0.56-0.74, detection F1 0 -> 0.72-0.87.
    RUNS = {
        "tiny": default_run(steps=200, eval_every=20, solver_options={
            "lower-only": dict(lower_lr=0.5),
            "soba": dict(upper_lr=10.0, lower_lr=0.5, z_lr=0.5),
            "stocbio": dict(upper_lr=10.0, lower_lr=0.5, inner_steps=5, neumann_steps=5, neumann_lr=0.5),
            "aid-cg": dict(upper_lr=10.0, lower_lr=0.5, inner_steps=5, cg_steps=5),
            "bo-rep": dict(upper_lr=0.3, lower_lr=0.5, neumann_lr=0.5),
            "slip": dict(upper_lr=0.3, lower_lr=0.5, neumann_lr=0.5)}),
    }

    def __init__(self, n_train: int = 1000, n_val: int = 300, n_test: int = 497, noise_rate: float = 0.5,
                 reg: float = 1e-3, batch_size: Optional[int] = 128, val_batch_size: Optional[int] = 128,
                 seed: int = 0, dtype: str = "float32", flag_threshold: float = 0.5, sampling: str = "blocks"):
        """
        Args:
            n_train: training samples (noisy labels; one weight each); n_train + n_val + n_test <= 1797.
            n_val: clean validation samples (the upper loss).
            n_test: clean test samples (``test_accuracy`` only).
            noise_rate: fraction in [0, 1) of training labels replaced by a different class.
            reg: weight (> 0) of the squared L2 penalty on W and b in the lower loss.
            batch_size: lower-level batch size (drawn from train); None for full batch.
            val_batch_size: upper-level batch size (drawn from val); None for full batch.
            sampling: "blocks" (default): fixed blocks of consecutive split indices, in a fresh
                order every epoch; "replacement": i.i.d. uniform indices (problems/batches.py).
            seed: seed of the splits and of the label corruption.
            dtype: "float32" or "float64", for the data and the variables.
            flag_threshold: in (0, 1); sample i is flagged as corrupted when sigmoid(x_i) < flag_threshold.
        """
        for option, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            check_int(NAME, option, value)
        if n_train + n_val + n_test > N_SAMPLES:
            raise ValueError(f"{NAME}: n_train + n_val + n_test = {n_train + n_val + n_test} exceeds the "
                             f"{N_SAMPLES} samples of the digits data set")
        check_cleaning_options(NAME, noise_rate, reg, flag_threshold)
        for option, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            check_int(NAME, option, value, allow_none=True, rule="an int >= 1 or None (full batch)")
        check_int(NAME, "seed", seed, minimum=None)

        self.n_train, self.n_val, self.n_test = int(n_train), int(n_val), int(n_test)
        self.noise_rate, self.reg, self.flag_threshold = float(noise_rate), float(reg), float(flag_threshold)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.sampling = sampling_option(NAME, sampling)
        self.seed, self.dtype = int(seed), check_dtype(NAME, dtype)

        features, labels = load_digits_arrays()
        train, val, test = split_indices(N_SAMPLES, (self.n_train, self.n_val, self.n_test), self.seed)
        # Corruption gets its own stream (entropy (seed, 1)), independent of the split permutation.
        noisy, mask = corrupt_labels(labels[train], self.noise_rate, N_CLASSES, (self.seed, 1))
        f_train, f_val, f_test = standardize(features[train], features[val], features[test])

        def as_float(a: np.ndarray) -> Tensor:
            return torch.tensor(a, dtype=self.dtype)

        self.train_features, self.val_features, self.test_features = map(as_float, (f_train, f_val, f_test))
        self.train_labels_noisy, self.train_labels_clean = torch.tensor(noisy), torch.tensor(labels[train])
        self.val_labels, self.test_labels = torch.tensor(labels[val]), torch.tensor(labels[test])
        self.corrupted_mask = torch.tensor(mask)
        self.n_features = self.train_features.shape[1]

    # -- the protocol --------------------------------------------------------------------------

    def lower_loss(self, x: Tree, y: Tree, batch: Optional[Tensor]) -> Tensor:
        """Weighted training CE on the noisy labels plus reg (||W||^2 + ||b||^2); batch indexes train."""
        ce = F.cross_entropy(logits(y, select(self.train_features, batch)),
                             select(self.train_labels_noisy, batch), reduction="none")
        weights = torch.sigmoid(select(x["weight_logits"], batch))
        return (weights * ce).mean() + self.reg * (y["W"].square().sum() + y["b"].square().sum())

    def init(self, generator: torch.Generator):
        """x0 = 0 (every weight 0.5) and y0 = 0."""
        like = dict(dtype=self.dtype, device=self.train_features.device)  # where the problem lives
        x = {"weight_logits": torch.zeros(self.n_train, **like)}
        y = {"W": torch.zeros(self.n_features, self.n_classes, **like), "b": torch.zeros(self.n_classes, **like)}
        return x, y

    def evaluate(self, x: Tree, y: Tree) -> Dict[str, float]:
        """Whole-split metrics: test_accuracy, val_loss, train_accuracy_clean (against the clean
        train labels), the detection scores f1, precision, recall of flagging the corrupted
        samples (flagged: sigmoid(x_i) < flag_threshold; precision and F1 are 0 when nothing is
        flagged, recall is 0 when nothing is corrupted) and the threshold-free detection_auc."""
        with torch.no_grad():
            y = {k: v.detach() for k, v in y.items()}
            flagged = torch.sigmoid(x["weight_logits"].detach()) < self.flag_threshold
            return {
                "test_accuracy": accuracy(y, self.test_features, self.test_labels),
                "val_loss": float(self.upper_loss(x, y, None)),
                "train_accuracy_clean": accuracy(y, self.train_features, self.train_labels_clean),
                **detection_scores(flagged, self.corrupted_mask),
                "detection_auc": detection_auc(x["weight_logits"].detach(), self.corrupted_mask),
            }

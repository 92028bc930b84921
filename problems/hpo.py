"""Hyperparameter optimization: learned L2 penalties of a logistic regression.

The upper level tunes one log-penalty per feature (or per class) so that the logistic regression
trained with those penalties does well on a validation split. This is the benchopt bilevel
benchmark's ``ijcnn1`` problem (binary, one weight per feature) and ``covtype`` problem
(multiclass, one weight per class), both with the ``exp`` parametrization
(github.com/benchopt/benchmark_bilevel), on offline stand-ins bundled with scikit-learn: ``breast-cancer``
(569 x 30, 2 classes) and ``digits`` (1797 x 64, 10 classes).

Variables, with d features and C classes:

    x = log_penalty in R^d  ("per-feature")   or   R^C  ("per-class")
    y = (W in R^{d x C}, b in R^C)             (multinomial logistic regression, logits a W + b)

The binary case is a multinomial model with C = 2 logits, so both data sets and both
regularizations share one model and one loss. Penalties, with W_j the j-th row (feature j) and
W_{:,k} the k-th column (class k):

    P(x, W) = 1/2 sum_j exp(x_j) ||W_j||^2           ("per-feature")
    P(x, W) = 1/2 sum_k exp(x_k) ||W_{:,k}||^2       ("per-class")

Losses, with CE(y; a, c) = -log softmax(a W + b)_c, training pairs (a_i, c_i), validation pairs
(a'_j, c'_j), and B a multiset of indices into the split (the whole split when batch=None):

    g(x, y; B) = 1/|B| sum_{i in B} CE(y; a_i, c_i) + P(x, W) + reg_floor (||W||_F^2 + ||b||^2)
    f(x, y; B) = 1/|B| sum_{j in B} CE(y; a'_j, c'_j)

The bias b is not penalized by P, and softmax CE is unchanged when the same constant is added to
every logit, so without the floor d2_yy g would be singular (in b, and in W when exp(x) -> 0).
The fixed ``reg_floor`` term makes g (2 reg_floor)-strongly convex in y for every x; benchopt
has no such term (its binary model has no bias and its penalties stay positive). f does not
depend on x: grad Phi(x) = -d2_xy g . v comes entirely from the implicit term.

Features are standardized with the training split's mean and std; the splits are consecutive
slices of one seeded permutation (see problems/digits.py). The default starting point is the
constant x0 = 0 (every penalty weight exp(0) = 1) and y0 = 0; benchopt draws x0 = log U(0, 1)
for ijcnn1 and uses x0 = -2 elsewhere, a constant keeps runs comparable across seeds.

References: F. Pedregosa, "Hyperparameter optimization with approximate gradient", ICML 2016
(HOAG; L2-regularized logistic regression with one penalty per feature); M. Dagreou, P. Ablin,
S. Vaiter, T. Moreau, "A framework for bilevel optimization that enables stochastic and global
variance reduction algorithms", NeurIPS 2022 (benchopt bilevel benchmark, ijcnn1 and covtype).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel.registry import register_problem
from bilevel.tree import Tree

from .batches import sampling_option
from .digits import load_digits_arrays, load_sklearn_bundled, split_indices, standardize
from .linear_classifier import LinearClassifierProblem, logits, select
from .options import check_choice, check_dtype, check_int, check_real, option_error
from .runs import default_run

NAME = "hpo"
REGULARIZATIONS = ("per-feature", "per-class")

#: Per data set: (n_samples, n_features, n_classes, default (n_train, n_val, n_test),
#: default regularization).
DATASETS = {
    "breast-cancer": (569, 30, 2, (300, 134, 135), "per-feature"),
    "digits": (1797, 64, 10, (1000, 400, 397), "per-class"),
}


def load_breast_cancer_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """Features, float64 of shape (569, 30), and labels in {0, 1}, int64 of shape (569,).

    scikit-learn's bundled copy of the Wisconsin diagnostic breast cancer data set (no download).
    """
    return load_sklearn_bundled("load_breast_cancer", "breast-cancer")


LOADERS = {"breast-cancer": load_breast_cancer_arrays, "digits": load_digits_arrays}


@register_problem(NAME, paper="Pedregosa, Hyperparameter optimization with approximate gradient, ICML 2016; "
                  "Dagreou et al., NeurIPS 2022 (benchopt bilevel benchmark, ijcnn1 and covtype)")
class HyperparameterOptimization(LinearClassifierProblem):
    """Learned per-feature or per-class L2 penalties of a logistic regression, tuned on validation.

    Attributes: ``train_features``, ``train_labels``, ``val_features``, ``val_labels``,
    ``test_features``, ``test_labels``, ``n_features`` (d), ``n_classes`` (C), ``dim_x``
    (d or C), ``dataset``, ``regularization``.
    """

    name = NAME
    headline_metrics = ("val_loss", "test_accuracy")
    #: grid search (bilevel.report.best_rows): the point with the lowest mean val_loss, then its test_accuracy
    selection = ("val_loss", "min", "test_accuracy")

    #: "tiny": seconds, for tests; "paper": benchopt's covtype-style per-class setting on digits
    #: (benchopt's ijcnn1 / covtype themselves are not available offline).
    PRESETS = {
        "tiny": {"dataset": "breast-cancer", "n_train": 100, "n_val": 100, "n_test": 100, "batch_size": 32,
                 "val_batch_size": 32},
        "paper": {"dataset": "digits", "regularization": "per-class"},
    }

    #: Default run of ``bilevel run problem=hpo preset=tiny`` (bilevel.config.default_run): 200
    #: steps; x holds log-penalties, whose hypergradient entries are O(1/n), hence upper_lr = 1
    #: for the SGD-type solvers; normalized steps of length 0.05 with lower_lr = 0.05 (at 0.5 the
    #: lower SGD overflows once the penalties grow). Measured (seed 0): val_loss 0.210
    #: (lower-only) -> 0.13-0.20.
    RUNS = {
        "tiny": default_run(steps=200, eval_every=20, solver_options={
            "lower-only": dict(lower_lr=0.5),
            "soba": dict(upper_lr=1.0, lower_lr=0.5, z_lr=0.5),
            "stocbio": dict(upper_lr=1.0, lower_lr=0.5, inner_steps=5, neumann_steps=5),
            "aid-cg": dict(upper_lr=1.0, lower_lr=0.5, inner_steps=5, cg_steps=5),
            "bo-rep": dict(upper_lr=0.05, lower_lr=0.05),
            "slip": dict(upper_lr=0.05, lower_lr=0.05)}),
    }

    def __init__(self, dataset: str = "breast-cancer", regularization: Optional[str] = None,
                 n_train: Optional[int] = None, n_val: Optional[int] = None, n_test: Optional[int] = None,
                 reg_floor: float = 1e-4, x0: float = 0.0, batch_size: Optional[int] = 64,
                 val_batch_size: Optional[int] = 64, seed: int = 0, dtype: str = "float64",
                 sampling: str = "blocks"):
        """
        Args:
            dataset: "breast-cancer" (569 x 30, binary) or "digits" (1797 x 64, 10 classes).
            regularization: "per-feature" (x in R^d) or "per-class" (x in R^C); None picks the
                data set's benchopt analogue: per-feature for breast-cancer (ijcnn1), per-class
                for digits (covtype).
            n_train, n_val, n_test: split sizes, n_train + n_val + n_test <= n_samples; None picks
                the data set's default (breast-cancer 300/134/135, digits 1000/400/397).
            reg_floor: weight (> 0) of the fixed reg_floor (||W||^2 + ||b||^2) term of g that makes
                it strongly convex in y (the bias is otherwise unpenalized).
            x0: initial value of every log-penalty (a finite number); penalty weights exp(x0).
            batch_size: lower-level batch size (drawn from train); None for full batch.
            val_batch_size: upper-level batch size (drawn from val); None for full batch.
            sampling: "blocks" (default): fixed blocks of consecutive split indices, in a fresh
                order every epoch; "replacement": i.i.d. uniform indices (problems/batches.py).
            seed: seed of the split permutation.
            dtype: "float32" or "float64", for the data and the variables.
        """
        check_choice(NAME, "dataset", dataset, sorted(DATASETS))
        n_samples, n_features, n_classes, default_sizes, default_reg = DATASETS[dataset]
        if regularization is None:
            regularization = default_reg
        if regularization not in REGULARIZATIONS:
            raise option_error(NAME, "regularization", f"one of {REGULARIZATIONS} or None", regularization)
        sizes = {option: check_int(NAME, option, default if value is None else value,
                                   rule="a positive int or None (the data set's default)")
                 for option, value, default in zip(("n_train", "n_val", "n_test"), (n_train, n_val, n_test),
                                                   default_sizes)}
        if sum(sizes.values()) > n_samples:
            raise ValueError(f"{NAME}: options n_train + n_val + n_test = {sizes['n_train']} + {sizes['n_val']} + "
                             f"{sizes['n_test']} exceed the {n_samples} samples of the {dataset} data set")
        check_real(NAME, "reg_floor", reg_floor, 0.0,
                   rule="a positive number (it makes the lower problem strongly convex)")
        check_real(NAME, "x0", x0, rule="a finite number (the initial log-penalty)")
        for option, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            check_int(NAME, option, value, allow_none=True, rule="a positive int or None (full batch)")
        check_int(NAME, "seed", seed, minimum=None)
        dtype = check_dtype(NAME, dtype)

        self.dataset, self.regularization = dataset, regularization
        self.n_train, self.n_val, self.n_test = sizes["n_train"], sizes["n_val"], sizes["n_test"]
        self.n_features, self.n_classes = n_features, n_classes
        self.dim_x = n_features if regularization == "per-feature" else n_classes
        self.reg_floor, self.x0 = float(reg_floor), float(x0)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.sampling = sampling_option(NAME, sampling)
        self.seed, self.dtype = int(seed), dtype

        features, labels = LOADERS[dataset]()
        train, val, test = split_indices(n_samples, (self.n_train, self.n_val, self.n_test), self.seed)
        f_train, f_val, f_test = standardize(features[train], features[val], features[test])

        def as_float(a: np.ndarray) -> Tensor:
            return torch.tensor(a, dtype=self.dtype)

        self.train_features, self.val_features, self.test_features = map(as_float, (f_train, f_val, f_test))
        self.train_labels, self.val_labels, self.test_labels = (
            torch.tensor(labels[idx]) for idx in (train, val, test))

    # -- the penalty ---------------------------------------------------------------------------

    def penalty(self, x: Tree, y: Tree) -> Tensor:
        """P(x, W) = 1/2 sum_j exp(x_j) ||W_j||^2 (rows, per-feature) or
        1/2 sum_k exp(x_k) ||W_{:,k}||^2 (columns, per-class)."""
        squares = y["W"].square().sum(dim=1 if self.regularization == "per-feature" else 0)
        return 0.5 * (torch.exp(x["log_penalty"]) * squares).sum()

    # -- the protocol --------------------------------------------------------------------------

    def lower_loss(self, x: Tree, y: Tree, batch: Optional[Tensor]) -> Tensor:
        """Mean training CE + P(x, W) + reg_floor (||W||^2 + ||b||^2); batch indexes train."""
        ce = F.cross_entropy(logits(y, select(self.train_features, batch)), select(self.train_labels, batch))
        floor = self.reg_floor * (y["W"].square().sum() + y["b"].square().sum())
        return ce + self.penalty(x, y) + floor

    def init(self, generator: torch.Generator):
        """x0: every log-penalty equal to the ``x0`` option; y0 = 0 (all logits equal)."""
        like = dict(dtype=self.dtype, device=self.train_features.device)  # where the problem lives
        x = {"log_penalty": torch.full((self.dim_x,), self.x0, **like)}
        y = {"W": torch.zeros(self.n_features, self.n_classes, **like), "b": torch.zeros(self.n_classes, **like)}
        return x, y

    def evaluate(self, x: Tree, y: Tree) -> Dict[str, float]:
        """Whole-split metrics: val_loss (f on all of val), val_accuracy, test_loss, test_accuracy,
        and mean_log_penalty (the mean of x)."""
        with torch.no_grad():
            y = {k: v.detach() for k, v in y.items()}
            val_logits, test_logits = logits(y, self.val_features), logits(y, self.test_features)
            return {
                "val_loss": float(F.cross_entropy(val_logits, self.val_labels)),
                "val_accuracy": float((val_logits.argmax(dim=1) == self.val_labels).double().mean()),
                "test_loss": float(F.cross_entropy(test_logits, self.test_labels)),
                "test_accuracy": float((test_logits.argmax(dim=1) == self.test_labels).double().mean()),
                "mean_log_penalty": float(x["log_penalty"].detach().mean()),
            }

"""Shared by problems whose lower variable is a linear softmax classifier y = {"W", "b"} over
fixed train / validation / test splits (hyper-cleaning, HPO):

    logits(y, a) = a W + b,      f(x, y; B) = mean_{i in B} CE(logits(y, a_i), label_i) over validation

Batches are LongTensors of indices into a split (None: the whole split), epoch-shuffled fixed
blocks (or i.i.d. uniform with sampling="replacement") of ``batch_size`` (train, lower level) and
``val_batch_size`` (validation, upper level); the
problem is a finite sum at both levels (``n_samples``, used by SABA); see :mod:`problems.batches`. Subclasses set
``n_train``, ``n_val``, ``batch_size``, ``val_batch_size``, ``val_features``, ``val_labels``
and define the lower loss.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from bilevel.problem import BilevelProblem
from bilevel.tree import Tree

from .batches import IndexBatches, select


def logits(y: Tree, features: Tensor) -> Tensor:
    return features @ y["W"] + y["b"]


def accuracy(y: Tree, features: Tensor, labels: Tensor) -> float:
    return float((logits(y, features).argmax(dim=1) == labels).double().mean())


class LinearClassifierProblem(IndexBatches, BilevelProblem):
    """Validation cross-entropy upper loss; split-indexed sampling and finite-sum sizes from
    :class:`~problems.batches.IndexBatches`."""

    def upper_loss(self, x: Tree, y: Tree, batch: Optional[Tensor]) -> Tensor:
        """Mean CE on the validation labels; batch indexes val. Independent of x."""
        return F.cross_entropy(logits(y, select(self.val_features, batch)), select(self.val_labels, batch))

"""Shared by problems whose lower variable is a linear softmax classifier y = {"W", "b"} over
fixed train / validation / test splits (hyper-cleaning, HPO):

    logits(y, a) = a W + b,      f(x, y; B) = mean_{i in B} CE(logits(y, a_i), label_i) over validation

Batches are LongTensors of indices into a split (None: the whole split), drawn i.i.d. uniformly
with ``batch_size`` (train, lower level) and ``val_batch_size`` (validation, upper level); the
problem is a finite sum at both levels (``n_samples``, used by SABA). Subclasses set
``n_train``, ``n_val``, ``batch_size``, ``val_batch_size``, ``val_features``, ``val_labels``
and define the lower loss.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel.problem import BilevelProblem, check_level
from bilevel.tree import Tree


def select(t: Tensor, batch: Optional[Tensor]) -> Tensor:
    """The rows of ``t`` in ``batch`` (all of them when batch is None)."""
    return t if batch is None else t[batch]


def logits(y: Tree, features: Tensor) -> Tensor:
    return features @ y["W"] + y["b"]


def accuracy(y: Tree, features: Tensor, labels: Tensor) -> float:
    return float((logits(y, features).argmax(dim=1) == labels).double().mean())


class LinearClassifierProblem(BilevelProblem):
    """Validation cross-entropy upper loss, split-indexed sampling, finite-sum sizes."""

    def upper_loss(self, x: Tree, y: Tree, batch: Optional[Tensor]) -> Tensor:
        """Mean CE on the validation labels; batch indexes val. Independent of x."""
        return F.cross_entropy(logits(y, select(self.val_features, batch)), select(self.val_labels, batch))

    def sample(self, level: str, generator: torch.Generator) -> Optional[Tensor]:
        """i.i.d. uniform indices into train ("lower") or val ("upper"); None for a full batch."""
        check_level(level)
        size, n = (self.batch_size, self.n_train) if level == "lower" else (self.val_batch_size, self.n_val)
        return None if size is None else torch.randint(n, (size,), generator=generator)

    def n_samples(self, level: str) -> int:
        """Size of the finite sum: n_train ("lower") or n_val ("upper")."""
        check_level(level)
        return self.n_train if level == "lower" else self.n_val

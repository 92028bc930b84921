"""Index batches over a training split (lower level) and a validation split (upper level).

Problems whose losses are means over samples of two fixed splits,

    g(x, y; B) = 1/|B| sum_{i in B} l_g(x, y; train_i),     f(x, y; B) = 1/|B| sum_{j in B} l_f(x, y; val_j),

use a 1-d LongTensor B of sample indices as the batch (None: the whole split) of ``batch_size``
(lower) or ``val_batch_size`` (upper) samples; ``n_samples`` gives the sizes of the two finite
sums (the protocol of :mod:`bilevel.memory`, used by SABA-type solvers). With the problem's
``sampling`` attribute "blocks" (the default) B is the next fixed block of consecutive indices
in an order drawn afresh every epoch (:mod:`bilevel.sampling`, the benchopt benchmark's sampler);
with "replacement" B holds i.i.d. uniform indices. Blocks are only as mixed as the split's row
order: a problem must store its splits in random order (the problems here take them from seeded
permutations), never sorted by class or length.
Token batches are also cut to their longest sequence (:func:`trim_padding`), and whole splits
are evaluated :data:`EVAL_CHUNK` rows at a time (:func:`in_chunks`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from bilevel.problem import check_level
from bilevel.sampling import SAMPLINGS, draw_indices, mode

from .models import PAD_INDEX
from .options import check_choice


#: Rows per forward call when a whole split is evaluated (bounds the activation memory).
EVAL_CHUNK = 512


def sampling_option(problem: str, value: str) -> str:
    """The ``sampling`` option of a finite-sum problem: "blocks" or "replacement"."""
    return check_choice(problem, "sampling", value, SAMPLINGS)


def in_chunks(fn: Callable[[Tensor], Tensor], rows: Tensor, size: int = EVAL_CHUNK) -> Tensor:
    """``fn`` applied to consecutive slices of ``size`` rows of ``rows``, concatenated."""
    return torch.cat([fn(part) for part in rows.split(size)])


def select(t: Tensor, batch: Optional[Tensor]) -> Tensor:
    """The rows of ``t`` in ``batch`` (all of them when batch is None)."""
    return t if batch is None else t[batch]


def _vmapped(tensor: Tensor) -> bool:
    """Whether ``tensor`` is batched by a ``torch.func.vmap`` at some functorch level (it may be
    wrapped by grad / jvp transforms above the batching)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):
        if functorch.is_batchedtensor(tensor):
            return True
        tensor = functorch.get_unwrapped(tensor)
    return False


def trim_padding(tokens: Tensor) -> Tensor:
    """Token ids (B, L) or (B, 2, L) cut after the last column holding a real token (at least one
    column). Padding sits at the end and never reaches a feature (see
    :class:`~problems.models.RecurrentEncoder`), so outputs are unchanged; only the work shrinks.
    Inside ``torch.func.vmap`` (a batched tensor: one batch per copy, bilevel.many) the ids are
    returned whole: the length would be a data-dependent shape, which vmap cannot batch."""
    if _vmapped(tokens):
        return tokens
    used = (tokens != PAD_INDEX).reshape(-1, tokens.shape[-1]).any(dim=0).nonzero()
    length = int(used.max()) + 1 if used.numel() else 1
    return tokens[..., :length]


class IndexBatches:
    """Mixin giving a :class:`~bilevel.problem.BilevelProblem` the ``sample`` / ``n_samples`` of
    the module docstring. The problem sets ``n_train``, ``n_val``, ``batch_size`` and
    ``val_batch_size`` (the latter two: int, or None for full batches), and may set ``sampling``
    ("blocks", the default, or "replacement")."""

    sampling = "blocks"

    def sample(self, level: str, generator: torch.Generator) -> Optional[Tensor]:
        """Indices into train ("lower") or val ("upper"): the next epoch-shuffled block, or i.i.d.
        uniform ones with ``sampling="replacement"``; None for a full batch."""
        n = self.n_samples(level)
        size = self.batch_size if level == "lower" else self.val_batch_size
        return draw_indices(n, size, level, generator, mode(self))

    def n_samples(self, level: str) -> int:
        """Size of the finite sum: n_train ("lower") or n_val ("upper")."""
        check_level(level)
        return self.n_train if level == "lower" else self.n_val

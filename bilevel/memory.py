"""SAGA memories over a fixed partition of a finite sum (SABA; reusable by other VR solvers).

Finite-sum problems. SAGA needs a fixed set of summands. A problem is a *finite sum* at a level when it exposes ``n_samples(level) -> int`` and
its losses accept a 1-d LongTensor of sample indices as the batch, the loss on it being the mean
of the per-sample losses (the quadratic and hyper-cleaning problems do). :func:`finite_sum_size`
checks this and raises a TypeError naming what is missing.

Partition. The n indices of a level are cut into K = ceil(n / batch_size) fixed consecutive
mini-batches B_k = [k b, min(n, (k + 1) b)) (the last one may be smaller): the blocks of
:mod:`bilevel.sampling`, and the index j of the next one comes from the same epoch-shuffled
stream the problem's own ``sample`` uses (benchopt's SABA indexes its memory by the block its
sampler serves), or uniformly with the problem's ``sampling="replacement"``
(:func:`partition_of`). With d_k the direction on B_k (a gradient of the mean loss over B_k, or
a product with its Hessian), the full-batch direction is the batch-size-weighted mean

    d = sum_k w_k d_k,        w_k = |B_k| / n.

SAGA estimate. A memory holds one entry M[k] per mini-batch (a tree, or a dict of trees for
several quantities sharing a batch, e.g. {"grad_y": ..., "hvp": ..., "cross": ...}) and their
weighted mean Mbar = sum_k w_k M[k]. With j uniform on {0..K-1} (a uniform draw, or the next
block of an epoch-shuffled order: each position of a random permutation is uniform):

    d_hat = K w_j (d_j - M[j]) + Mbar          then      M[j] <- d_j,  Mbar <- Mbar + w_j (d_j - M[j]_old)

E_j[d_hat] = d, so the estimate is unbiased for the full-batch direction. When every mini-batch
has the same size, K w_j = 1 and this is the textbook d_j - M[j] + mean_k M[k]; the factor K w_j
only corrects for a smaller last batch. Mbar is kept up to date incrementally (as benchopt does),
so an estimate costs O(size of one entry), not O(K).

Memories are immutable: :func:`update` returns a new :class:`Memory` (the stacked table copied
with entry j replaced, ``index_copy`` out of place), so states stay pure and checkpointable
(``torch.save``). The mini-batch j reaches a step as a :class:`Block` of tensors (its index, its
sample indices, w_j and K w_j), so the step is one graph for every j.
Initialization: :func:`zeros` (benchopt's ``mode_init_memory='zero'``), or :func:`full` from the
directions on every mini-batch at one point (a full pass).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Sequence, Tuple, Union

import torch
from torch import Tensor

from .sampling import Blocks, mode as sampling_mode

#: A tensor, or a dict whose values are Nested (a tree, or a dict of trees).
Nested = Union[Tensor, Dict[str, Any]]


def _map(fn: Callable[..., Tensor], first: Nested, *others: Nested) -> Nested:
    """Apply ``fn`` leaf-wise over nested dicts of tensors with the same keys."""
    if isinstance(first, Tensor):
        return fn(first, *others)
    for other in others:
        if not isinstance(other, dict) or other.keys() != first.keys():
            raise ValueError(f"memory entries have different structures: {sorted(first)} vs "
                             f"{sorted(other) if isinstance(other, dict) else type(other).__name__}")
    return {k: _map(fn, v, *(o[k] for o in others)) for k, v in first.items()}


def finite_sum_size(problem, level: str, who: str = "this solver") -> int:
    """n_samples(level) of a finite-sum problem; TypeError naming the problem when it is not one."""
    label = f"problem {getattr(problem, 'name', '?')!r} ({type(problem).__name__})"
    counter = getattr(problem, "n_samples", None)
    if not callable(counter):
        raise TypeError(
            f"{who} needs a finite-sum problem, but {label} has no n_samples(level) method; add "
            "n_samples(level) -> int (the number of samples of the 'upper' or 'lower' loss) and accept "
            "a LongTensor of sample indices as the batch of upper_loss and lower_loss")
    n = counter(level)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TypeError(f"{who}: {label}.n_samples({level!r}) must return a positive int, got {n!r}")
    return n


#: The fixed mini-batches (the blocks of :mod:`bilevel.sampling`, drawn epoch by epoch or uniformly).
Partition = Blocks


def partition_of(problem, level: str, batch_size: int, who: str = "this solver") -> Partition:
    """The fixed mini-batches of ``level`` of a finite-sum problem, drawn with the problem's own
    ``sampling`` mode, so that the memory indexes the blocks the problem itself serves."""
    return Partition(finite_sum_size(problem, level, who), batch_size, level, sampling_mode(problem))


class Block(NamedTuple):
    """Mini-batch j of a partition as tensors, so that a step indexes its memory without any
    Python int: ``index`` (a LongTensor of shape (1,): j), ``indices`` (its sample indices, the
    problem's batch), ``weight`` w_j = |B_j| / n and ``factor`` K w_j (0-d float64 tensors,
    cast to each entry's dtype where used, the rounding of the Python floats they replace)."""
    index: Tensor
    indices: Tensor
    weight: Tensor
    factor: Tensor


_BLOCKS: Dict[Tuple[str, int, int, str], Tuple[Block, ...]] = {}


def blocks(partition: Partition, device=None) -> Tuple[Block, ...]:
    """The :class:`Block` of every mini-batch of ``partition`` on ``device`` (made once per
    (level, n, batch_size, device) and reused: a draw then costs no tensor construction). Per
    level, so that the lower and upper blocks of one step are never the same tensor objects
    (an aliasing that changed from step to step would change a compiled graph)."""
    device = torch.device("cpu" if device is None else device)
    key = (partition.level, partition.n, partition.batch_size, str(device))
    if key not in _BLOCKS:
        K = partition.n_batches
        _BLOCKS[key] = tuple(Block(index=torch.tensor([k], device=device), indices=partition.batch(k, device),
                                   weight=torch.tensor(partition.weight(k), dtype=torch.float64, device=device),
                                   factor=torch.tensor(partition.size(k) * K / partition.n, dtype=torch.float64,
                                                       device=device))
                             for k in range(K))
    return _BLOCKS[key]


def block(partition: Partition, j: int, device=None) -> Block:
    """Mini-batch ``j`` of ``partition`` as a :class:`Block`."""
    if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < partition.n_batches:
        raise ValueError(f"block index must be an int in [0, {partition.n_batches}), got {j!r}")
    return blocks(partition, device)[j]


def _scalar(value: Tensor, like: Tensor) -> Tensor:
    """A 0-d float64 weight in the dtype of ``like`` (one rounding, as a Python float gets)."""
    return value.to(dtype=like.dtype, device=like.device)


class Memory(NamedTuple):
    """SAGA table: ``table`` has the structure of one entry with every leaf stacked over the K
    mini-batches (leaf shape (K, *entry shape); M[k] = :func:`entry`), ``average`` = sum_k w_k M[k].
    Stacked tensors, not a tuple of entries: a step reads and writes entry j by a tensor index
    (``index_select`` / ``index_copy``), so its graph does not depend on j (torch.compile, vmap)."""
    table: Nested
    average: Nested


def entry(memory: Memory, k) -> Nested:
    """M[k], k an int or a :class:`Block`."""
    index = k.index if isinstance(k, Block) else torch.tensor([k])
    return _map(lambda m: m.index_select(0, index.to(m.device)).squeeze(0), memory.table)


def zeros(like: Nested, partition: Partition) -> Memory:
    """All entries zero (benchopt's ``mode_init_memory='zero'``)."""
    K = partition.n_batches
    return Memory(table=_map(lambda t: t.new_zeros((K,) + tuple(t.shape)), like), average=_map(torch.zeros_like, like))


def full(entries: Sequence[Nested], partition: Partition) -> Memory:
    """M[k] = entries[k] (the directions on every mini-batch at one point), Mbar their weighted mean."""
    if len(entries) != partition.n_batches:
        raise ValueError(f"need one entry per mini-batch ({partition.n_batches}), got {len(entries)}")
    average = _map(torch.zeros_like, entries[0])
    for k, one in enumerate(entries):
        average = _map(lambda a, e, w=partition.weight(k): a + w * e, average, one)
    return Memory(table=_map(lambda *leaves: torch.stack(leaves), *entries), average=average)


def estimate(memory: Memory, j: Block, current: Nested) -> Nested:
    """d_hat = K w_j (d_j - M[j]) + Mbar, with d_j = ``current`` the direction on mini-batch j."""
    return _map(lambda d, m, a: a + _scalar(j.factor, d) * (d - m), current, entry(memory, j), memory.average)


def update(memory: Memory, j: Block, current: Nested) -> Memory:
    """M[j] <- d_j and Mbar <- Mbar + w_j (d_j - M[j]); a new Memory, the old one is untouched
    (``index_copy`` out of place)."""
    average = _map(lambda a, d, m: a + _scalar(j.weight, d) * (d - m), memory.average, current, entry(memory, j))
    table = _map(lambda m, d: m.index_copy(0, j.index, d.unsqueeze(0)), memory.table, current)
    return Memory(table=table, average=average)


def saga(memory: Memory, j: Block, current: Nested) -> Tuple[Nested, Memory]:
    """(:func:`estimate`, :func:`update`): the variance-reduced direction and the new memory."""
    return estimate(memory, j, current), update(memory, j, current)

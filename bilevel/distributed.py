"""Data parallelism over ``torch.distributed``: N ranks compute the single-process step.

Launch any run with torchrun (``torchrun --nproc_per_node=N -m bilevel run ...``, or a script
calling :func:`bilevel.solve`); :func:`setup` initialises the default process group from
torchrun's environment (``WORLD_SIZE`` > 1; backend NCCL for CUDA runs, gloo on the CPU).

Semantics. Every rank holds x, y and the solver state, and draws the SAME global batches from
the same seeded run generator (the sampling code is unchanged). The split happens in the
oracles (:mod:`bilevel.oracles`), the one place every gradient, Hessian-vector and cross product
passes through: for a global batch B of sample indices (a 1-d integer tensor of at least N
entries) rank r keeps the r-th of N consecutive slices B_r (``torch.tensor_split``, sizes
differing by at most one), differentiates the weighted local loss w_r l(x, y; B_r) with
w_r = |B_r| / |B|, and the results are summed over the ranks (``all_reduce``):

    sum_r w_r grad l(B_r) = sum_r |B_r|/|B| * 1/|B_r| sum_{i in B_r} grad l_i = grad l(B),

the gradient of the global batch's mean loss; likewise every product d2 g . v, which is linear
in the loss. Terms independent of the batch (a regulariser) enter each rank with weight w_r and
sum to weight 1. So every step equals the single-process step on the concatenated global batch,
up to the rounding of a differently ordered sum. Batches that are not split, and are computed
whole on every rank (correct, not parallel): full batches (``None``), index tensors shorter than
N, any other batch type, and everything computed outside the oracles (unrolled ITD, a problem's
``evaluate``).

Losses coupled across the batch (a softmax over the batch's scores, BLISS) read the whole
batch's values through :func:`gather_batch`, differentiable: the weight w_r is applied to the
loss before differentiation, so the gradients flowing back through the gather land, weighted,
on the rank that computed each score, and the sum over ranks is again the global gradient.

Only rank 0 writes files (:func:`is_main`); the evaluation of a step runs on rank 0 and its
record is broadcast (:func:`broadcast_object`), so every rank sees the same records.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .tree import Tree


def available() -> bool:
    return torch.distributed.is_available()


def active() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files."""
    return rank() == 0


def env_world_size() -> int:
    """torchrun's ``WORLD_SIZE`` (1 when unset); a clear error when it is not a positive int."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"environment variable WORLD_SIZE must be a positive integer, got {value!r}")
    return size


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def setup(device=None) -> bool:
    """Initialise the default process group from torchrun's environment (``env://``) when
    ``WORLD_SIZE`` > 1 and none exists yet: NCCL when ``device`` is CUDA (None or "auto": when
    CUDA is available, :func:`bilevel.device.resolve_device`), else gloo. On CUDA the rank's
    current device becomes ``cuda:LOCAL_RANK``, so "cuda" means the rank's GPU
    (:func:`rank_device`). Returns :func:`active`."""
    if not available() or torch.distributed.is_initialized() or env_world_size() == 1:
        return active()
    from .device import resolve_device
    cuda = resolve_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank())
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return active()


def rank_device(device):
    """``device`` with the rank's CUDA index when it is a bare "cuda" in a distributed run."""
    if device is None or not active():
        return device
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", local_rank())
    return device


_WHOLE: List[bool] = []


@contextlib.contextmanager
def whole_batches() -> Iterator[None]:
    """Within the block, oracles compute whole batches with no collective (a rank-0-only
    evaluation must not wait for the other ranks)."""
    _WHOLE.append(True)
    try:
        yield
    finally:
        _WHOLE.pop()


def shard(batch: Any) -> Optional[Tuple[Tensor, float]]:
    """(this rank's slice of ``batch``, its weight |B_r| / |B|), or None when the batch is not
    split (one process, inside :func:`whole_batches`, a batch that is not a 1-d integer tensor,
    or one shorter than the number of ranks): see the module docstring."""
    if _WHOLE or not active() or not isinstance(batch, Tensor) or batch.dim() != 1 or batch.is_floating_point():
        return None
    size = world_size()
    if batch.numel() < size:
        return None
    local = torch.tensor_split(batch, size)[rank()]
    return local, local.numel() / batch.numel()


def all_reduce_trees(*trees: Optional[Tree]) -> Tuple[Optional[Tree], ...]:
    """Every tensor of ``trees`` summed over the ranks (None trees pass through), in one
    ``all_reduce`` per dtype and device (the tensors flattened into one buffer)."""
    groups = {}
    for i, t in enumerate(trees):
        for key, value in (t or {}).items():
            groups.setdefault((value.dtype, value.device), []).append((i, key, value))
    out = [dict(t) if t is not None else None for t in trees]
    for entries in groups.values():
        buffer = torch.cat([v.reshape(-1) for _, _, v in entries])
        torch.distributed.all_reduce(buffer)
        offset = 0
        for i, key, value in entries:
            out[i][key] = buffer[offset:offset + value.numel()].view_as(value)
            offset += value.numel()
    return tuple(out)


def all_reduce_grads(parameters: Sequence[Tensor]) -> None:
    """Every parameter's ``.grad`` replaced by its sum over the ranks (one ``all_reduce`` per
    dtype, :func:`all_reduce_trees`); a parameter without a gradient gets zeros, so that every
    rank reduces the same buffers. Nothing in one process. For a module trained data parallel
    by hand, each rank's loss its share of the global batch's (:func:`bilevel.problems.
    selection_train.train_lm`)."""
    if not active():
        return
    params = list(parameters)
    grads = {str(i): (p.grad if p.grad is not None else torch.zeros_like(p)) for i, p in enumerate(params)}
    summed, = all_reduce_trees(grads)
    for i, p in enumerate(params):
        p.grad = summed[str(i)]


_ON_SLICE: List[float] = []


@contextlib.contextmanager
def on_slice(weight: float) -> Iterator[None]:
    """Marks the forward pass of a loss on this rank's slice of a global batch, of weight
    w_r = |B_r| / |B| (the oracles open it): only there does :func:`gather_batch` gather across
    the ranks, and :func:`slice_weight` is w_r."""
    _ON_SLICE.append(weight)
    try:
        yield
    finally:
        _ON_SLICE.pop()


def slice_weight() -> float:
    """w_r = |B_r| / |B| inside a loss evaluated on this rank's slice (:func:`on_slice`), else 1.
    The oracles multiply a rank's loss by w_r, which is right for a mean over the batch; a loss
    that SUMS over the batch (sum_i P_i l_i with softmax weights P summing to one over the global
    batch) divides that sum by ``slice_weight()``."""
    return _ON_SLICE[-1] if _ON_SLICE and not _WHOLE and active() else 1.0


def gather_batch(values: Tensor) -> Tuple[Tensor, slice]:
    """(``values`` of the whole global batch, the rows of it that are this rank's), for losses
    coupled across the batch (a softmax over the batch's scores). Inside a loss evaluated by an
    oracle on this rank's slice (:func:`on_slice`), the per-sample ``values`` of every rank are
    concatenated in rank order (= the global batch's order), differentiably (:class:`_AllGather`:
    gradients reaching another rank's rows flow back to that rank, in reverse and forward mode); otherwise (one process, a batch computed whole) ``values`` and all rows.

    The oracles weight a rank's loss by w_r = |B_r| / |B| and sum over the ranks, so a coupled
    loss written with the global values and divided by w_r (:func:`slice_weight`), e.g. for
    softmax weights p = softmax(s) over the global batch,

        g_r = sum_{i in B_r} p_i l_i / w_r              (= sum_{i in B} p_i l_i with one process),

    gives sum_r w_r g_r = sum_{i in B} p_i l_i, the single-process loss."""
    if not _ON_SLICE or _WHOLE or not active():
        return values, slice(0, values.shape[0])
    size = torch.tensor([values.shape[0]], device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    torch.distributed.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = values
    if values.shape[0] < max(sizes):
        pad = values.new_zeros((max(sizes) - values.shape[0],) + tuple(values.shape[1:]))
        padded = torch.cat([values, pad])
    parts = _AllGather.apply(padded).split(max(sizes))
    start = sum(sizes[:rank()])
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), slice(start, start + values.shape[0])


def _gather_rows(values: Tensor) -> Tensor:
    parts = [torch.empty_like(values) for _ in range(world_size())]
    torch.distributed.all_gather(parts, values.contiguous())
    return torch.cat(parts)


def _my_rows_of_sum(values: Tensor, rows: int) -> Tensor:
    total = values.clone()
    torch.distributed.all_reduce(total)
    return total[rank() * rows:(rank() + 1) * rows].clone()


class _AllGather(torch.autograd.Function):
    """A(v) = concat_q v_q: the ranks' equal-shaped ``v`` concatenated along dim 0 in rank order
    (on every rank). Linear, with adjoint A*(C)_q = (sum_r C_r)[rows of q]
    (:class:`_MyRowsOfSum`), so its derivative rules are itself and its adjoint, each again an
    autograd Function: twice differentiable (reverse over reverse), with a forward-mode rule and
    ``setup_context``, so ``torch.func`` transforms (jvp of grad: forward-over-reverse products)
    can run through it. ``torch.distributed.nn.functional.all_gather`` has neither (a
    ``torch.func`` transform refuses it)."""

    @staticmethod
    def forward(values):
        return _gather_rows(values)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.rows = inputs[0].shape[0]

    @staticmethod
    def backward(ctx, cotangent):
        return _MyRowsOfSum.apply(cotangent, ctx.rows)

    @staticmethod
    def jvp(ctx, tangent):
        return _gather_rows(tangent)


class _MyRowsOfSum(torch.autograd.Function):
    """S(C) = (sum_r C_r)[rows of this rank]: the adjoint of :class:`_AllGather` (a reduce-scatter
    of equal row blocks), whose adjoint is :class:`_AllGather` again."""

    @staticmethod
    def forward(values, rows):
        return _my_rows_of_sum(values, rows)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.rows = inputs[1]

    @staticmethod
    def backward(ctx, cotangent):
        return _AllGather.apply(cotangent), None

    @staticmethod
    def jvp(ctx, tangent, _):
        return _my_rows_of_sum(tangent, ctx.rows)


def broadcast_object(value: Any, source: int = 0) -> Any:
    """``value`` of rank ``source`` on every rank (itself in one process)."""
    if not active():
        return value
    box: List[Any] = [value]
    torch.distributed.broadcast_object_list(box, src=source)
    return box[0]


def check_same(values: Sequence[Any], what: str) -> None:
    """Raise on every rank when ``values`` differ between ranks (e.g. the seed)."""
    if not active():
        return
    gathered: List[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, list(values))
    if any(g != gathered[0] for g in gathered):
        raise ValueError(f"{what} must be the same on every rank, got {gathered}")

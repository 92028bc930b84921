"""Upper-level updates as small transforms that chain (in the style of optax).

A :class:`Transform` is a pair ``init(x) -> state`` and
``update(direction, state, **extra) -> (direction, state)``. :func:`chain` composes them left
to right; the final direction ``u`` is applied as ``x <- x - u`` (:func:`apply`).

States are typed and tensor-only (NamedTuples whose leaves are tensors: pytrees for
``torch.utils._pytree`` and ``torch.func``), so a solver step holding them can be vmapped,
compiled and checkpointed. Transforms that count their updates (schedules, Adam's bias
correction, STORM's first step) keep the count as a 0-d int64 tensor ``count``; a solver passes
the outer iteration as the keyword ``t`` (a Python int, equal to the count when the transform
is updated once per iteration) so that no tensor is read back to the host inside a step;
without ``t`` the count is read (standalone use). For example
normalized momentum (BO-REP, SLIP)

    m_t = beta m_{t-1} + (1 - beta) h_t,        x_{t+1} = x_t - lr m_t / ||m_t||

is ``chain(ema(beta), normalize(), scale(lr))``. Step sizes are numbers or schedules t -> lr_t
(:mod:`bilevel.schedules`), t counting the updates (the outer iteration in the solvers).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Tuple

import torch

from . import tree
from .schedules import PolyDecay, StepSize, at
from .tree import Tree

NORMALIZATIONS = ("global", "per_tensor")


class Transform(NamedTuple):
    init: Callable[[Tree], Any]
    update: Callable[..., Tuple[Tree, Any]]


def apply(x: Tree, direction: Tree) -> Tree:
    """x - direction."""
    return tree.sub(x, direction)


# ---------------------------------------------------------------------------------------------
# Step sizes: numbers or schedules, from bilevel.schedules (the one place for them).

#: Kept for the existing API: ``polynomial_decay(c, e)`` is ``PolyDecay(c, e)``, t -> c / (t + 1)^e.
polynomial_decay = PolyDecay


# ---------------------------------------------------------------------------------------------
# The STORM correction, shared with bilevel.recursive.

def storm_correction(h: Tree, m: Tree, previous: Tree, beta: float) -> Tree:
    """Recursive momentum (STORM, Cutkosky and Orabona 2019) with weight ``beta`` on the past:

        m_t = h_t + beta (m_{t-1} - h'_{t-1})

    where h'_{t-1} is the estimate at the previous point on the current sample. beta = 1 is
    SPIDER/SARAH; ``m_t = beta m_{t-1} + (1 - beta) h_t + beta (h_t - h'_{t-1})`` is the same.
    """
    return tree.map(lambda hv, mv, pv: hv + beta * (mv - pv), h, m, previous)


# ---------------------------------------------------------------------------------------------
# Transforms.

class Count(NamedTuple):
    """The number of updates so far, a 0-d int64 tensor (:func:`scale`)."""
    count: torch.Tensor


class Momentum(NamedTuple):
    """A running direction m (:func:`ema`, :func:`heavy_ball`)."""
    m: Tree


class Storm(NamedTuple):
    """STORM's running direction m and the update count (:func:`storm`)."""
    m: Tree
    count: torch.Tensor


class Adam(NamedTuple):
    """Adam's first and second moments and the update count (:func:`adam`)."""
    m: Tree
    v: Tree
    count: torch.Tensor


class Stateless(NamedTuple):
    """The (empty) state of a transform that keeps nothing (:func:`normalize`, :func:`clip`)."""


def _zero_count() -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64)


def _step(count: torch.Tensor, t: Optional[int]) -> int:
    """The 0-based index of this update: ``t`` when the caller passes it (as it is: a CUDA-graph
    capture passes a stand-in that records how t is used, bilevel.many_graph), else the stored count."""
    return int(count) if t is None else t


def scale(step_size: StepSize) -> Transform:
    """u <- lr_t u, with lr_t a constant or a schedule of the iteration t = 0, 1, ..."""

    def update(u, state, t: Optional[int] = None, **extra):
        return tree.scale(u, at(step_size, _step(state.count, t))), Count(state.count + 1)
    return Transform(lambda x: Count(_zero_count()), update)


def sgd(step_size: StepSize) -> Transform:
    """Plain SGD: x <- x - lr_t h."""
    return scale(step_size)


def ema(beta: float) -> Transform:
    """Exponential moving average ("momentum" in BO-REP, SLIP, MA-SOBA):
    m_t = beta m_{t-1} + (1 - beta) h_t, with m_{-1} = 0."""
    _check_unit(beta, "beta")

    def update(h, state, **extra):
        m = tree.map(lambda mv, hv: beta * mv + (1 - beta) * hv, state.m, h)
        return m, Momentum(m)
    return Transform(lambda x: Momentum(tree.zeros_like(x)), update)


def heavy_ball(beta: float) -> Transform:
    """Heavy-ball momentum (Polyak): m_t = beta m_{t-1} + h_t, with m_{-1} = 0."""
    _check_unit(beta, "beta")

    def update(h, state, **extra):
        m = tree.axpy(beta, state.m, h)
        return m, Momentum(m)
    return Transform(lambda x: Momentum(tree.zeros_like(x)), update)


def storm(beta: float) -> Transform:
    """Recursive momentum (STORM, Cutkosky and Orabona 2019; AccBO's upper update), by
    :func:`storm_correction`:

        m_t = h_t + beta (m_{t-1} - h_{t-1}'),     m_0 = h_0

    where h_{t-1}' is the estimate at the *previous* point on the *current* sample, passed as
    ``update(h_t, state, previous=h_{t-1}')``. It must be given from the second call on.
    """
    _check_unit(beta, "beta")

    def update(h, state, previous: Optional[Tree] = None, t: Optional[int] = None, **extra):
        count = state.count + 1
        if _step(state.count, t) == 0:
            return h, Storm(h, count)
        if previous is None:
            raise ValueError("storm needs previous=<estimate at the previous point on the current sample>")
        m = storm_correction(h, state.m, previous, beta)
        return m, Storm(m, count)
    return Transform(lambda x: Storm(tree.zeros_like(x), _zero_count()), update)


def normalize(kind: str = "global", eps: float = 0.0) -> Transform:
    """u <- u / (||u|| + eps): one norm over all tensors (``"global"``) or one per tensor
    (``"per_tensor"``, the AccBO AUC code). A zero direction stays zero (chosen with
    ``torch.where``, no host read of the norm)."""
    if kind not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {kind!r}")

    def divide(t, n):
        denominator = n + eps
        return torch.where(denominator > 0, t / denominator, torch.zeros_like(t))

    def update(u, state, **extra):
        if kind == "global":
            n = tree.norm(u)
            return {k: divide(v, n) for k, v in u.items()}, state
        return {k: divide(v, v.norm()) for k, v in u.items()}, state
    return Transform(lambda x: Stateless(), update)


def clip(max_norm: float) -> Transform:
    """u <- u min(1, max_norm / ||u||) (global norm; the factor chosen with ``torch.where``, no
    host read of the norm)."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")

    def update(u, state, **extra):
        n = tree.norm(u)
        factor = torch.where(n > max_norm, max_norm / n, torch.ones_like(n))
        return tree.scale(u, factor), state
    return Transform(lambda x: Stateless(), update)


def clip_each(u: Tree, max_norm: float) -> Tree:
    """Every tensor scaled to norm at most ``max_norm`` on its own (no host synchronisation)."""
    return {k: v * torch.clamp(max_norm / v.norm(), max=1.0) for k, v in u.items()}


def clip_per_tensor(max_norm: float) -> Transform:
    """u_k <- u_k min(1, max_norm / ||u_k||) for every tensor k separately (BLISS's ``grad_clip``
    on the score model's hypergradient: a tensor whose norm exceeds 1 is scaled to unit norm)."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    return Transform(lambda x: Stateless(), lambda u, state, **extra: (clip_each(u, max_norm), state))


def decoupled_weight_decay(weight_decay: float) -> Transform:
    """u <- u + weight_decay x (Loshchilov and Hutter, "Decoupled Weight Decay Regularization",
    ICLR 2019): after :func:`adam` and before :func:`scale`, the step x <- x - lr_t (adam + wd x)
    is torch.optim.AdamW's. The update needs the current point: ``update(u, state, params=x)``."""
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")

    def update(u, state, params: Optional[Tree] = None, **extra):
        if not weight_decay:
            return u, state
        if params is None:
            raise ValueError("decoupled_weight_decay needs params=<the current x> in update()")
        return tree.axpy(weight_decay, params, u), state
    return Transform(lambda x: Stateless(), update)


def adamw(step_size: StepSize, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-2) -> Transform:
    """torch.optim.AdamW as a chain: ``chain(adam(b1, b2, eps), decoupled_weight_decay(wd),
    scale(lr))``; call ``update(h, state, params=x)``."""
    return chain(adam(b1, b2, eps), decoupled_weight_decay(weight_decay), scale(step_size))


def adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Transform:
    """Adam's direction with bias correction (Kingma and Ba 2015); chain with :func:`scale`:

        m_t = b1 m_{t-1} + (1 - b1) h_t,      v_t = b2 v_{t-1} + (1 - b2) h_t^2
        u_t = (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)            (t = 1, 2, ...)

    ``eps`` is AdamBO's lambda.
    """
    _check_unit(b1, "b1"), _check_unit(b2, "b2")

    def update(h, state, t: Optional[int] = None, **extra):
        k = _step(state.count, t) + 1
        m = tree.map(lambda mv, hv: b1 * mv + (1 - b1) * hv, state.m, h)
        v = tree.map(lambda vv, hv: b2 * vv + (1 - b2) * hv * hv, state.v, h)
        c1, c2 = 1 - b1 ** k, 1 - b2 ** k
        u = tree.map(lambda mv, vv: (mv / c1) / ((vv / c2).sqrt() + eps), m, v)
        return u, Adam(m, v, state.count + 1)
    return Transform(lambda x: Adam(tree.zeros_like(x), tree.zeros_like(x), _zero_count()), update)


def chain(*transforms: Transform) -> Transform:
    """Compose transforms left to right; ``extra`` keywords reach every transform."""

    def init(x):
        return tuple(t.init(x) for t in transforms)

    def update(u, states, **extra):
        new_states = []
        for t, s in zip(transforms, states):
            u, s = t.update(u, s, **extra)
            new_states.append(s)
        return u, tuple(new_states)
    return Transform(init, update)


def _check_unit(value: float, name: str) -> None:
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(f"{name} must lie in [0, 1), got {value}")

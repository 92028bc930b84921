"""Upper-level updates as small transforms that chain (in the style of optax).

A :class:`Transform` is a pair ``init(x) -> state`` and
``update(direction, state, **extra) -> (direction, state)``. :func:`chain` composes them left
to right; the final direction ``u`` is applied as ``x <- x - u`` (:func:`apply`). For example
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

def scale(step_size: StepSize) -> Transform:
    """u <- lr_t u, with lr_t a constant or a schedule of the iteration t = 0, 1, ..."""

    def update(u, count, **extra):
        return tree.scale(u, at(step_size, count)), count + 1
    return Transform(lambda x: 0, update)


def sgd(step_size: StepSize) -> Transform:
    """Plain SGD: x <- x - lr_t h."""
    return scale(step_size)


def ema(beta: float) -> Transform:
    """Exponential moving average ("momentum" in BO-REP, SLIP, MA-SOBA):
    m_t = beta m_{t-1} + (1 - beta) h_t, with m_{-1} = 0."""
    _check_unit(beta, "beta")

    def update(h, m, **extra):
        m = tree.map(lambda mv, hv: beta * mv + (1 - beta) * hv, m, h)
        return m, m
    return Transform(tree.zeros_like, update)


def heavy_ball(beta: float) -> Transform:
    """Heavy-ball momentum (Polyak): m_t = beta m_{t-1} + h_t, with m_{-1} = 0."""
    _check_unit(beta, "beta")

    def update(h, m, **extra):
        m = tree.axpy(beta, m, h)
        return m, m
    return Transform(tree.zeros_like, update)


def storm(beta: float) -> Transform:
    """Recursive momentum (STORM, Cutkosky and Orabona 2019; AccBO's upper update), by
    :func:`storm_correction`:

        m_t = h_t + beta (m_{t-1} - h_{t-1}'),     m_0 = h_0

    where h_{t-1}' is the estimate at the *previous* point on the *current* sample, passed as
    ``update(h_t, state, previous=h_{t-1}')``. It must be given from the second call on.
    """
    _check_unit(beta, "beta")

    def update(h, state, previous: Optional[Tree] = None, **extra):
        m, started = state
        if not started:
            return h, (h, True)
        if previous is None:
            raise ValueError("storm needs previous=<estimate at the previous point on the current sample>")
        m = storm_correction(h, m, previous, beta)
        return m, (m, True)
    return Transform(lambda x: (tree.zeros_like(x), False), update)


def normalize(kind: str = "global", eps: float = 0.0) -> Transform:
    """u <- u / (||u|| + eps): one norm over all tensors (``"global"``) or one per tensor
    (``"per_tensor"``, the AccBO AUC code). A zero direction stays zero."""
    if kind not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {kind!r}")

    def divide(t, n):
        return t / (n + eps) if float(n) + eps > 0 else torch.zeros_like(t)

    def update(u, state, **extra):
        if kind == "global":
            n = tree.norm(u)
            return {k: divide(v, n) for k, v in u.items()}, state
        return {k: divide(v, v.norm()) for k, v in u.items()}, state
    return Transform(lambda x: None, update)


def clip(max_norm: float) -> Transform:
    """u <- u min(1, max_norm / ||u||) (global norm)."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")

    def update(u, state, **extra):
        n = float(tree.norm(u))
        return (tree.scale(u, max_norm / n) if n > max_norm else u), state
    return Transform(lambda x: None, update)


def clip_each(u: Tree, max_norm: float) -> Tree:
    """Every tensor scaled to norm at most ``max_norm`` on its own (no host synchronisation)."""
    return {k: v * torch.clamp(max_norm / v.norm(), max=1.0) for k, v in u.items()}


def clip_per_tensor(max_norm: float) -> Transform:
    """u_k <- u_k min(1, max_norm / ||u_k||) for every tensor k separately (BLISS's ``grad_clip``
    on the score model's hypergradient: a tensor whose norm exceeds 1 is scaled to unit norm)."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    return Transform(lambda x: None, lambda u, state, **extra: (clip_each(u, max_norm), state))


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
    return Transform(lambda x: None, update)


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

    def update(h, state, **extra):
        m, v, t = state
        t += 1
        m = tree.map(lambda mv, hv: b1 * mv + (1 - b1) * hv, m, h)
        v = tree.map(lambda vv, hv: b2 * vv + (1 - b2) * hv * hv, v, h)
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        u = tree.map(lambda mv, vv: (mv / c1) / ((vv / c2).sqrt() + eps), m, v)
        return u, (m, v, t)
    return Transform(lambda x: (tree.zeros_like(x), tree.zeros_like(x), 0), update)


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

"""A lower loop of AdamW steps with gradient-norm clipping (BLISS's proxy updates).

Each outer iteration t runs ``steps`` steps, each on its own lower batch (drawn up front by
:meth:`AdamW.sample`), of torch.optim.AdamW (Loshchilov and Hutter, ICLR 2019) on g(x, .) with
the gradient clipped to global norm ``clip_norm`` first (Lightning Fabric's
``clip_gradients(max_norm=1.0)`` in BLISS's ``bilevel_selection.py``):

    d       = grad_y g(x, y; batch) min(1, clip_norm / ||grad_y g||)
    m      <- b1 m + (1 - b1) d,        v <- b2 v + (1 - b2) d^2,        k <- k + 1
    y      <- y - lr_t (wd y + (m / (1 - b1^k)) / (sqrt(v / (1 - b2^k)) + eps))

The moments persist across outer iterations (BLISS keeps one optimizer for the whole bilevel
phase); the bias-correction index of the k-th step of iteration t is k = t steps + k + 1, read
from t (a Python int) so that no step reads a tensor back to the host: the loop must run at
every iteration from t = 0. ``lr`` is a number or a schedule of the outer iteration t (all K
steps of one outer iteration use lr_t, as BLISS steps its schedulers once per outer iteration).

Same interface as the loops of :mod:`bilevel.lower`: ``init(y)``, ``sample(problem, t,
generator)``, ``update(problem, x, state, batches)`` (pure), ``step(...)``, ``point(state)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch

from . import tree
from .batches import LowerBatches
from .lower import _Loop, draw_lower
from .oracles import grad_lower_y
from .schedules import at
from .tree import Tree
from .upper import Adam, adam, decoupled_weight_decay


class AdamWState(NamedTuple):
    """The proxy iterate y and AdamW's moments (:class:`bilevel.upper.Adam`)."""
    y: Tree
    moments: Adam


def clip_global(g: Tree, max_norm: Optional[float]) -> Tree:
    """g scaled to global norm at most ``max_norm`` (``None``: unchanged); no host sync."""
    if max_norm is None:
        return g
    return tree.scale(g, torch.clamp(max_norm / tree.norm(g), max=1.0))


@dataclass(frozen=True)
class AdamW(_Loop):
    """``steps`` clipped AdamW steps per outer iteration (see the module docstring)."""
    lr: Any
    steps: int = 1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: Optional[float] = 1.0

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be positive or None, got {self.clip_norm!r}")
        decoupled_weight_decay(self.weight_decay)  # validates weight_decay
        adam(self.b1, self.b2, self.eps)  # validates the betas

    def init(self, y: Tree) -> AdamWState:
        y = tree.clone(y)
        return AdamWState(y=y, moments=adam(self.b1, self.b2, self.eps).init(y))

    def sample(self, problem, t: int, generator: torch.Generator) -> LowerBatches:
        return draw_lower(problem, t, generator, self.steps)

    def update(self, problem, x: Tree, state: AdamWState, batches: LowerBatches) -> AdamWState:
        lr, y, moments = at(self.lr, batches.t), state.y, state.moments
        transform, decay = adam(self.b1, self.b2, self.eps), decoupled_weight_decay(self.weight_decay)
        for k, batch in enumerate(batches.steps):
            g = clip_global(grad_lower_y(problem, x, y, batch), self.clip_norm)
            direction, moments = transform.update(g, moments, t=batches.t * self.steps + k)
            direction, _ = decay.update(direction, None, params=y)
            y = tree.axpy(-lr, direction, y)
        return AdamWState(y=y, moments=moments)

    def point(self, state: AdamWState) -> Tree:
        return state.y

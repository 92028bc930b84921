"""A lower loop of AdamW steps with gradient-norm clipping (BLISS's proxy updates).

Each outer iteration runs ``steps`` steps, every one on a fresh lower batch, of torch.optim.AdamW
(Loshchilov and Hutter, ICLR 2019) on g(x, .) with the gradient clipped to global norm
``clip_norm`` first (Lightning Fabric's ``clip_gradients(max_norm=1.0)`` in BLISS's
``bilevel_selection.py``):

    d       = grad_y g(x, y; fresh batch) min(1, clip_norm / ||grad_y g||)
    m      <- b1 m + (1 - b1) d,        v <- b2 v + (1 - b2) d^2,        k <- k + 1
    y      <- y - lr_t (wd y + (m / (1 - b1^k)) / (sqrt(v / (1 - b2^k)) + eps))

The moments and the step count k persist across outer iterations (BLISS keeps one optimizer for
the whole bilevel phase). ``lr`` is a number or a schedule of the outer iteration t (all K steps
of one outer iteration use lr_t, as BLISS steps its scheduler once per outer iteration).

Same interface as the loops of :mod:`bilevel.lower`: ``init(y)``, ``update(problem, x, state,
generator, iteration)``, ``point(state)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch

from . import tree
from .oracles import grad_lower_y
from .schedules import at
from .tree import Tree
from .upper import adam, decoupled_weight_decay


class AdamWState(NamedTuple):
    y: Tree
    moments: Any  # the (m, v, k) state of bilevel.upper.adam


def clip_global(g: Tree, max_norm: Optional[float]) -> Tree:
    """g scaled to global norm at most ``max_norm`` (``None``: unchanged); no host sync."""
    if max_norm is None:
        return g
    return tree.scale(g, torch.clamp(max_norm / tree.norm(g), max=1.0))


@dataclass(frozen=True)
class AdamW:
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

    def step(self, problem, x: Tree, state: AdamWState, lr: float, generator: torch.Generator) -> AdamWState:
        """One clipped AdamW step on a fresh lower batch."""
        batch = problem.sample("lower", generator)
        g = clip_global(grad_lower_y(problem, x, state.y, batch), self.clip_norm)
        direction, moments = adam(self.b1, self.b2, self.eps).update(g, state.moments)
        direction, _ = decoupled_weight_decay(self.weight_decay).update(direction, None, params=state.y)
        return AdamWState(y=tree.axpy(-lr, direction, state.y), moments=moments)

    def update(self, problem, x: Tree, state: AdamWState, generator: torch.Generator,
               iteration: int = 0) -> AdamWState:
        lr = at(self.lr, iteration)
        for _ in range(self.steps):
            state = self.step(problem, x, state, lr, generator)
        return state

    def point(self, state: AdamWState) -> Tree:
        return state.y

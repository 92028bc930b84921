"""Stateful hypergradient estimators for solvers.

An estimator is ``init(x, y) -> state`` and ``__call__(problem, x, y, state, draw) ->
(hypergradient, state)``. The samples come in a :class:`Draw` made by :func:`draw`, so a solver
can evaluate one draw at two points (STORM) and chooses whether the Hessian and cross batches
are shared. The state carries warm starts (the z of linear-system SGD, the v of CG).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch

from . import linear_system, tree
from .hypergrad import FreshBatches, implicit
from .tree import Tree


class Draw(NamedTuple):
    """Samples for one hypergradient: upper batch (grad f), Hessian batch, cross batch, and a
    seed for the estimator's own randomness (the randomized Neumann term)."""
    upper: Any
    hessian: Any
    cross: Any
    seed: int


def draw(problem, generator: torch.Generator, share_lower_batch: bool = False) -> Draw:
    """Independent upper, Hessian and cross batches (one lower batch if ``share_lower_batch``)."""
    upper = problem.sample("upper", generator)
    hessian = problem.sample("lower", generator)
    cross = hessian if share_lower_batch else problem.sample("lower", generator)
    return Draw(upper, hessian, cross, int(torch.randint(2 ** 62, (1,), generator=generator)))


def _hessian_batches(problem, sample: Draw, generator: torch.Generator, resample: bool):
    """The draw's one Hessian batch, or (``resample``) a fresh batch per product drawn from the
    draw's own generator, so that one draw evaluated at two points sees the same batches."""
    return FreshBatches(problem, generator) if resample else sample.hessian


@dataclass(frozen=True)
class Neumann:
    """v from a truncated Neumann series (``variant`` "sum" or "randomized"), no state.

    ``resample=False``: all products on the draw's Hessian batch (StocBiO); ``True``: a fresh
    lower batch per product (Ghadimi and Wang's HIA, used by BSA and TTSA)."""
    lr: float
    steps: int = 10
    variant: str = "sum"
    hvp_mode: str = "reverse"
    resample: bool = False

    def init(self, x: Tree, y: Tree) -> None:
        return None

    def __call__(self, problem, x, y, state, sample: Draw):
        generator = torch.Generator().manual_seed(sample.seed)
        randomized = self.variant in linear_system.RANDOMIZED_NEUMANN
        term = linear_system.draw_neumann_term(self.steps, generator) if randomized else None
        hessian = _hessian_batches(problem, sample, generator, self.resample)

        def solve(matvec, b):
            return linear_system.neumann_series(matvec, b, steps=self.steps, lr=self.lr,
                                                variant=self.variant, term=term)
        h, _ = implicit(problem, x, y, sample.upper, hessian, sample.cross, solve, self.hvp_mode)
        return h, state


@dataclass(frozen=True)
class ConjugateGradient:
    """v by ``steps`` CG iterations, warm-started from the previous v when ``warm_start``;
    ``negative_curvature``: "raise" or "truncate" (see :func:`linear_system.conjugate_gradient`)."""
    steps: int = 10
    warm_start: bool = True
    tol: float = 0.0
    hvp_mode: str = "reverse"
    negative_curvature: str = "raise"

    def init(self, x: Tree, y: Tree) -> Optional[Tree]:
        return None

    def __call__(self, problem, x, y, v_prev, sample: Draw):
        init = v_prev if self.warm_start else None

        def solve(matvec, b):
            return linear_system.conjugate_gradient(matvec, b, steps=self.steps, init=init, tol=self.tol,
                                                    negative_curvature=self.negative_curvature)
        return implicit(problem, x, y, sample.upper, sample.hessian, sample.cross, solve, self.hvp_mode)


@dataclass(frozen=True)
class LinearSystemSGD:
    """z <- z - lr (H z - grad_y f) for ``steps`` steps from the previous z, optional projection
    onto a ball of ``radius``; the hypergradient uses the updated z. ``resample``: a fresh lower
    batch for each step's product (AmIGO's stochastic linear-system steps)."""
    lr: float
    steps: int = 1
    radius: Optional[float] = None
    hvp_mode: str = "reverse"
    resample: bool = False

    def init(self, x: Tree, y: Tree) -> Tree:
        return tree.zeros_like(y)

    def __call__(self, problem, x, y, z, sample: Draw):
        hessian = _hessian_batches(problem, sample, torch.Generator().manual_seed(sample.seed), self.resample)

        def solve(matvec, b):
            return linear_system.linear_sgd(matvec, b, steps=self.steps, lr=self.lr, init=z, radius=self.radius)
        return implicit(problem, x, y, sample.upper, hessian, sample.cross, solve, self.hvp_mode)

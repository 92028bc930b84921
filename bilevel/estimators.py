"""Stateful hypergradient estimators for solvers.

An estimator is ``init(x, y) -> state``, ``draw(problem, generator, share_lower_batch) -> Draw``
and ``__call__(problem, x, y, state, draw) -> (hypergradient, state)``. Every random choice of
one hypergradient (its batches and the randomized Neumann term) is drawn up front from the run's
generator into a :class:`Draw`, in the algorithm's order and nothing more, so a solver can
evaluate one draw at two points (STORM, SPIDER) and see exactly the same samples. The state
carries warm starts (the z of linear-system SGD, the v of CG).

Step sizes are plain numbers here; a solver resolves an ``"auto"`` step (:mod:`bilevel.spectrum`)
before it builds the estimator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch

from . import linear_system, tree
from .hypergrad import PerProduct, implicit
from .tree import Tree


class Draw(NamedTuple):
    """Samples for one hypergradient: upper batch (grad f), Hessian batch (one for every product)
    or a :class:`~bilevel.hypergrad.PerProduct` of batches (one per product), cross batch, and
    the randomized Neumann term q (``None`` when the estimator has none)."""
    upper: Any
    hessian: Any
    cross: Any
    term: Optional[int] = None


def draw(problem, generator: torch.Generator, share_lower_batch: bool = False, *,
         products: Optional[int] = None, term: Optional[int] = None) -> Draw:
    """Draw, in this order, the upper batch, then the Hessian batch (``products=None``: one batch
    for every product) or ``products`` lower batches (one per product), then the cross batch.

    ``share_lower_batch``: the cross product reuses the (first) Hessian batch instead of drawing
    its own (with ``products=0`` one lower batch is drawn for it). ``term`` is stored as is.
    """
    upper = problem.sample("upper", generator)
    if products is None:
        hessian = problem.sample("lower", generator)
        first = hessian
    else:
        hessian = PerProduct(problem.sample("lower", generator) for _ in range(int(products)))
        first = hessian[0] if hessian else None
    if share_lower_batch:
        cross = first if products is None or hessian else problem.sample("lower", generator)
    else:
        cross = problem.sample("lower", generator)
    return Draw(upper, hessian, cross, term)


def draw_for(estimator, problem, generator: torch.Generator, share_lower_batch: bool = False) -> Draw:
    """The estimator's own :meth:`draw` when it has one, else :func:`draw` (one Hessian batch)."""
    own = getattr(estimator, "draw", None)
    if own is not None:
        return own(problem, generator, share_lower_batch)
    return draw(problem, generator, share_lower_batch)


@dataclass(frozen=True)
class Neumann:
    """v from a truncated Neumann series of ``steps`` Hessian-vector products (``variant`` "sum",
    "randomized" or a ``code_n*``; see :func:`bilevel.linear_system.neumann_series`), no state.

    ``resample=True`` (default): a fresh lower batch per product, as in StocBiO (Ji et al. 2021,
    Algorithm 2), Ghadimi and Wang's HIA (2018, Algorithm 3) and benchopt's ``shia``/``hia``.
    ``False``: all products on one batch, a biased estimate (the mean of one batch's powers is
    not the powers of the mean Hessian): on benchopt's quadratic (d = 100, n = 1024, batch 64,
    lr = 1/L of the mean Hessian; 100 draws) 10 products on one batch were 15% (+-9%) off the
    mean-Hessian series and 30 products a factor 1750 off (a batch Hessian's larger eigenvalues
    make I - lr H_b expand), fresh batches 0.7% (+-0.6%) and 0.8% (+-0.8%).
    ``lr`` must be a number (a solver resolves "auto" first)."""
    lr: float
    steps: int = 10
    variant: str = "sum"
    hvp_mode: str = "reverse"
    resample: bool = True

    def init(self, x: Tree, y: Tree) -> None:
        return None

    def draw(self, problem, generator: torch.Generator, share_lower_batch: bool = False) -> Draw:
        """q first (randomized variants, from the run's generator), then :func:`draw` with one
        batch per product when ``resample``."""
        term = None
        if self.variant in linear_system.RANDOMIZED_NEUMANN:
            term = linear_system.draw_neumann_term(self.steps, generator, self.variant)
        products = linear_system.neumann_products(self.steps, self.variant, term) if self.resample else None
        return draw(problem, generator, share_lower_batch, products=products, term=term)

    def __call__(self, problem, x, y, state, sample: Draw):
        randomized = self.variant in linear_system.RANDOMIZED_NEUMANN
        if randomized and sample.term is None:
            raise ValueError(f"the {self.variant!r} Neumann variant needs the draw's term q; "
                             "make the draw with this estimator's draw()")

        def solve(matvec, b):
            return linear_system.neumann_series(matvec, b, steps=self.steps, lr=self.lr, variant=self.variant,
                                                term=sample.term if randomized else None)
        h, _ = implicit(problem, x, y, sample.upper, sample.hessian, sample.cross, solve, self.hvp_mode)
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
    batch for each step's product, drawn up front (AmIGO's stochastic linear-system steps).
    Needs lr < 2/L, L the largest eigenvalue of the batch Hessians (see
    :mod:`bilevel.spectrum` for ``"auto"``, resolved by the solver)."""
    lr: float
    steps: int = 1
    radius: Optional[float] = None
    hvp_mode: str = "reverse"
    resample: bool = False

    def init(self, x: Tree, y: Tree) -> Tree:
        return tree.zeros_like(y)

    def draw(self, problem, generator: torch.Generator, share_lower_batch: bool = False) -> Draw:
        return draw(problem, generator, share_lower_batch, products=self.steps if self.resample else None)

    def __call__(self, problem, x, y, z, sample: Draw):
        def solve(matvec, b):
            return linear_system.linear_sgd(matvec, b, steps=self.steps, lr=self.lr, init=z, radius=self.radius)
        return implicit(problem, x, y, sample.upper, sample.hessian, sample.cross, solve, self.hvp_mode)

"""Recursive (variance-reduced) estimates of the two directions of a bilevel step.

Variance-reduced bilevel methods carry running estimates of

    d^y ~ grad_y g(x, y)        (moves y)            d^x ~ grad Phi(x, y)        (moves x)

and carry them from an old point to a new one with the SAME samples B at both points:

    d_new = G(new; B) + beta (d_old - G(old; B)),      G = (grad_y g, hypergradient estimate)

the STORM correction :func:`bilevel.upper.storm_correction` (one formula, one weight ``beta`` on
the past, also AccBO's upper update), applied to both levels:

* beta = 1 - eta: STORM, recursive momentum (Cutkosky and Orabona 2019), as in SUSTAIN and MRBO
                  (eta is benchopt's name for the weight of the new estimate);
* beta = 1:       SPIDER / SARAH (Fang et al. 2018; Nguyen et al. 2017), as in VRBO between its
                  periodic large-batch refreshes.

One sample B is a lower batch for grad_y g plus one :class:`~bilevel.estimators.Draw` for the
hypergradient (upper batch, the Hessian batches -- one per product by default -- the cross batch and
the randomized Neumann term q, all drawn up front), so G(new; B) - G(old; B) carries no sampling
noise of its own. Drawing (:func:`sample`, :func:`refresh_samples`) and evaluating
(:func:`evaluate`, :func:`recursive_update`, :func:`mean_estimates`) are separate, so a solver
draws in its ``sample`` and evaluates in its pure ``update`` (:mod:`bilevel.batches`). Estimators must be stateless
(:class:`~bilevel.estimators.Neumann`): they are called with state ``None``.

Used by the single-loop STORM solvers (solvers/_double_momentum.py: SUSTAIN, MRBO) and by VRBO.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch

from . import tree
from .batches import Sample
from .estimators import draw_for
from .hypergrad import PerProduct
from .oracles import grad_lower_y
from .tree import Tree
from .upper import storm_correction

Point = Tuple[Tree, Tree]


class Estimates(NamedTuple):
    """Running estimates at one point: ``lower`` of grad_y g, ``upper`` of the hypergradient."""
    lower: Tree
    upper: Tree


def sample(problem, generator: torch.Generator, share_lower_batch: bool = False, estimator=None) -> Sample:
    """A fresh lower batch, then a fresh Draw for ``estimator`` (all independent; see
    :func:`bilevel.estimators.draw_for`: with a Neumann estimator, q and one batch per product)."""
    return Sample(problem.sample("lower", generator), draw_for(estimator, problem, generator, share_lower_batch))


def evaluate(problem, estimator, x: Tree, y: Tree, batch: Sample) -> Estimates:
    """G(x, y; B) = (grad_y g(x, y; B.lower), estimator's hypergradient at (x, y) on B.draw).
    Costs one lower gradient plus the estimator's cost."""
    h, _ = estimator(problem, x, y, None, batch.draw)
    return Estimates(grad_lower_y(problem, x, y, batch.lower), h)


def recursive_update(problem, estimator, new: Point, old: Point, estimates: Estimates, beta: float,
                     batch: Sample) -> Estimates:
    """d_new = G(new; B) + beta (d_old - G(old; B)) (:func:`bilevel.upper.storm_correction`), both
    levels, ONE sample B at both points."""
    at_new = evaluate(problem, estimator, *new, batch)
    at_old = evaluate(problem, estimator, *old, batch)
    return Estimates(*(storm_correction(n, d, o, beta) for n, d, o in zip(at_new, estimates, at_old)))


def refresh_samples(problem, generator: torch.Generator, batches: int, share_lower_batch: bool = False,
                    estimator=None) -> Tuple[Sample, ...]:
    """The samples of a large-batch refresh: ``batches`` independent ones, or a single one when
    the problem is deterministic (its sample() returns None: the full batch)."""
    samples = []
    for _ in range(batches):
        samples.append(sample(problem, generator, share_lower_batch, estimator))
        if problem_is_deterministic(samples[-1]):
            break
    return tuple(samples)


def mean_estimates(problem, estimator, x: Tree, y: Tree, samples: Tuple[Sample, ...]) -> Estimates:
    """The mean of G(x, y; B) over ``samples`` (a large-batch G)."""
    total = None
    for batch in samples:
        value = evaluate(problem, estimator, x, y, batch)
        total = value if total is None else Estimates(*map(tree.add, total, value))
    return Estimates(*(tree.scale(t, 1.0 / len(samples)) for t in total))


def refresh(problem, estimator, x: Tree, y: Tree, generator: torch.Generator, batches: int,
            share_lower_batch: bool = False) -> Estimates:
    """A large-batch G(x, y): :func:`mean_estimates` over :func:`refresh_samples`."""
    samples = refresh_samples(problem, generator, batches, share_lower_batch, estimator)
    return mean_estimates(problem, estimator, x, y, samples)


def problem_is_deterministic(batch: Sample) -> bool:
    """Every batch of the sample is None: the problem's sample() returns full batches."""
    hessian = batch.draw.hessian
    hessians = tuple(hessian) if isinstance(hessian, PerProduct) else (hessian,)
    return all(b is None for b in (batch.lower, batch.draw.upper, batch.draw.cross, *hessians))

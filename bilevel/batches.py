"""The sampling vocabulary: what one outer iteration draws, as a typed record.

Every solver splits an outer iteration t into

    batches = solver.sample(problem, t, generator)     the only place the run's generator is used
    state   = solver.update(problem, state, batches)   pure: no generator, no Python-side state

and ``solver.step(problem, run)`` is the two in a row (:mod:`bilevel.solver`). ``sample`` draws,
in the algorithm's order (so a run's random stream is the one of drawing them on the fly), every
batch the update will use and every random integer it needs (the randomized Neumann term q in an
estimator's :class:`~bilevel.estimators.Draw`, SABA's mini-batch indices). A lower loop's K
inner steps draw their K batches up front (:meth:`bilevel.lower.SGD.sample`).

The iteration counter t is NOT in the tensor state: it is passed from outside, as the field
``t`` (a Python int) of every batches record. Step-size schedules c / (t + 1)^e, periodic lower
updates (t % period) and Adam's bias correction read it as a number, so a step never reads a
tensor back to the host and float results are those of the Python arithmetic they always were.
Under ``torch.func.vmap`` the copies of a run share t: close over it (``batches._replace(t=...)``
inside the vmapped function) or give ``in_dims=None`` for it.

Each solver's record is a NamedTuple whose first field is ``t``; the records of the families are
here, one-solver records beside their solver. The records nest the estimator's
:class:`~bilevel.estimators.Draw` (one hypergradient's batches and Neumann term, drawn by the
estimator's ``draw``: the seam with :mod:`bilevel.estimators`), whose Hessian batches may be a
:class:`~bilevel.hypergrad.PerProduct`, and the recursions' :class:`Sample`.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Tuple

from torch.utils import _pytree

from .estimators import Draw
from .hypergrad import PerProduct

# A PerProduct (one lower batch per Hessian-vector product) is a tuple subclass; registered as a
# pytree node so that tree_map / vmap see through it to the batches it holds.
if PerProduct not in _pytree.SUPPORTED_NODES:
    _pytree.register_pytree_node(PerProduct, lambda p: (list(p), None), lambda xs, _: PerProduct(xs))


class LowerBatches(NamedTuple):
    """The batches of a lower loop's update at iteration t: one lower batch per inner step
    (empty on an iteration a periodic loop skips)."""
    t: int
    steps: Tuple[Any, ...]


class Sample(NamedTuple):
    """The samples of one evaluation of G = (grad_y g, hypergradient) in the variance-reduced
    recursions (:mod:`bilevel.recursive`): a lower batch for grad_y g and a Draw for the
    hypergradient."""
    lower: Any
    draw: Draw


class ComposedBatches(NamedTuple):
    """One iteration of a :class:`~bilevel.solver.ComposedSolver`: the lower loop's batches and
    the estimator's draw (drawn in the order the algorithm uses them)."""
    t: int
    lower: LowerBatches
    draw: Draw


class SingleLoopBatches(NamedTuple):
    """SOBA's family: one lower batch i and one upper batch j (drawn in that order)."""
    t: int
    lower: Any
    upper: Any


__all__ = ["LowerBatches", "Sample", "ComposedBatches", "SingleLoopBatches", "Draw", "PerProduct"]

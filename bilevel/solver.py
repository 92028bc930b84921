"""The solver contract.

A solver is a dataclass of hyperparameters. One outer iteration t is split in two
(:mod:`bilevel.batches`):

    sample(problem, t, generator) -> batches        draws everything iteration t uses, in the
                                                     algorithm's order, from the run's generator
    update(problem, state, batches) -> state         pure: a function of the typed state and the
                                                     batches only (no generator, no Python-side
                                                     state), so torch.func.vmap and
                                                     torch.compile can take it

The typed state (``state`` above) is a NamedTuple of the solver's own variables whose leaves
are tensors (x, y, z, momenta, memories ...; see each solver's ``*State`` class). The iteration
counter is NOT in it: it travels as the ``t`` of the batches. A solver whose step sizes were
given as "auto" resolves them at init (:meth:`Solver.resolve_steps`); ``update`` and ``sample``
are methods of the solver with those numbers filled in (:meth:`Solver.with_resolved`).

Around the typed state, the run record :class:`State` holds what a run needs to continue and
what it has cost, outside the tensors: the iteration, the run's ``torch.Generator`` (a
:class:`~bilevel.sampling.RunGenerator`), the cumulative oracle calls and time, and the resolved
"auto" steps. The convenience methods work on it:

    init(problem, x, y, generator) -> State          (may run warm-start steps on y)
    step(problem, state) -> State                    update(sample(...)), iteration + 1

``step`` never modifies its input, except that sampling advances the state's generator in
place (``solve`` resumes from a copy of it). A run is checkpointed by
:func:`bilevel.checkpoint.save_checkpoint`.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, NamedTuple, Optional, Tuple

import torch

from . import spectrum, upper
from .batches import ComposedBatches
from .estimators import draw_for
from .lower import warm_start
from .schedules import resolved
from .tree import Tree


class State(NamedTuple):
    """The run record: the solver's typed tensor state ``core`` and the run's bookkeeping."""
    core: Any
    iteration: int
    generator: torch.Generator
    #: cumulative oracle calls and solver time of the runs that produced this state (set by solve)
    calls: Optional[dict] = None
    elapsed: float = 0.0
    #: step sizes given as "auto", resolved to numbers at init (field name -> value)
    resolved: Optional[dict] = None

    @property
    def x(self) -> Tree:
        return self.core.x

    @property
    def y(self) -> Tree:
        """The current lower iterate (for AccBO the SNAG iterate; its point is the average)."""
        return self.core.y


def core_of(state) -> Any:
    """The typed state of a run record, or ``state`` itself when it is already a typed state."""
    return state.core if isinstance(state, State) else state


@dataclasses.dataclass
class Solver(abc.ABC):
    """Base class; subclasses are registered with :func:`bilevel.registry.register_solver`."""

    @abc.abstractmethod
    def init(self, problem, x: Tree, y: Tree, generator: torch.Generator) -> State:
        """The run record before the first outer iteration (iteration 0)."""

    @abc.abstractmethod
    def sample(self, problem, t: int, generator: torch.Generator):
        """Every batch and random integer of outer iteration ``t``, drawn from ``generator`` in
        the algorithm's order (a NamedTuple whose first field is ``t``)."""

    @abc.abstractmethod
    def update(self, problem, state, batches):
        """One outer iteration on the typed state, from the batches of :meth:`sample`: pure."""

    def step(self, problem, state: State) -> State:
        """One outer iteration on the run record: ``update(sample(...))``."""
        solver = self.with_resolved(state)
        batches = solver.sample(problem, state.iteration, state.generator)
        return state._replace(core=solver.update(problem, state.core, batches), iteration=state.iteration + 1)

    def start(self, core, generator: torch.Generator, resolved: Optional[dict] = None) -> State:
        """The run record at iteration 0 around the typed state ``core``."""
        return State(core=core, iteration=0, generator=generator, resolved=resolved)

    def point(self, state) -> Tuple[Tree, Tree]:
        """The (x, y) at which the run is evaluated (an averaged iterate for some solvers), from a
        run record or a typed state."""
        core = core_of(state)
        return core.x, core.y

    def hyperparameters(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    #: fields that accept "auto": 1/L of the lower Hessian, estimated at init (bilevel.spectrum)
    auto_steps = ("neumann_lr", "z_lr")  # a class attribute, not a dataclass field

    def resolve_steps(self, problem, x: Tree, y: Tree, generator: torch.Generator) -> Optional[dict]:
        """The numbers of the fields given as "auto": one :func:`bilevel.spectrum.auto_step` at
        (x, y), shared by all of them (its HVPs are counted; it draws one lower batch and the
        power iteration's start from ``generator``). ``None`` when no field is "auto"."""
        fields = self.hyperparameters()  # a name of auto_steps the solver lacks is never "auto"
        names = [n for n in self.auto_steps if spectrum.is_auto(fields.get(n))]
        if not names:
            return None
        step = spectrum.auto_step(problem, x, y, generator)
        return {n: step for n in names}

    def with_steps(self, resolved: Optional[dict]) -> "Solver":
        """This solver with the fields of ``resolved`` (the "auto" ones) replaced by its numbers."""
        return dataclasses.replace(self, **resolved) if resolved else self

    def with_resolved(self, state: "State") -> "Solver":
        """This solver with its "auto" fields replaced by the numbers ``state`` holds."""
        return self.with_steps(state.resolved)


def _stored(estimator_state: Any) -> Any:
    """An estimator's state as a state field: ``()`` (no leaves) for a stateless estimator's None,
    since torch.utils._pytree counts None as a (non-tensor) leaf."""
    return () if estimator_state is None else estimator_state


def _loaded(field: Any) -> Any:
    """The inverse of :func:`_stored`: what the estimator is given back."""
    return None if isinstance(field, tuple) and len(field) == 0 else field


class ComposedState(NamedTuple):
    """A :class:`ComposedSolver`'s variables: x, the lower loop's state, the estimator's state
    (z of linear-system SGD, v of CG once computed, ``()`` for a stateless estimator or a CG
    without a v yet) and the upper transform's."""
    x: Tree
    lower: Any
    estimator: Any
    upper: Any

    @property
    def y(self) -> Tree:
        return self.lower.y


class ComposedSolver(Solver):
    """A solver made of the three parts, one outer iteration being

        y-side:  lower_state <- lower_loop.update(x_t, lower_state, its batches)  (before or after h_t)
        h_t, est <- estimator(x_t, lower_loop.point(lower_state), est, fresh draw)
        x_{t+1} = x_t - upper_update(h_t)

    Subclasses define :meth:`lower_loop`, :meth:`estimator` and :meth:`upper_update`, and may set
    ``update_lower_first = False`` (single-loop methods evaluating h_t at y_t, then stepping y
    from y_t). ``warm_steps`` and ``share_lower_batch`` are class attributes here, not dataclass
    fields, so that a solver has them as hyperparameters only when it declares them as fields
    (``warm_steps: int = 3``) and uses them.
    """

    update_lower_first = True
    #: steps of the lower loop at x_0 in :meth:`init` (none unless a subclass declares the field)
    warm_steps = 0
    #: the cross product on the first Hessian batch instead of its own (bilevel.estimators.draw)
    share_lower_batch = False

    @abc.abstractmethod
    def lower_loop(self):
        """A loop from :mod:`bilevel.lower`."""

    @abc.abstractmethod
    def estimator(self):
        """An estimator from :mod:`bilevel.estimators`."""

    @abc.abstractmethod
    def upper_update(self):
        """A transform from :mod:`bilevel.upper`."""

    def estimator_at(self, iteration: int):
        """:meth:`estimator` built with every step size resolved at ``iteration``
        (:func:`bilevel.schedules.resolved`): estimators take float steps."""
        return resolved(self, iteration).estimator()

    def init(self, problem, x, y, generator):
        loop = self.lower_loop()
        lower_state = loop.init(y)
        if self.warm_steps:
            lower_state = warm_start(loop, problem, x, lower_state, self.warm_steps, generator)
        resolved = self.resolve_steps(problem, x, loop.point(lower_state), generator)
        solver = self.with_steps(resolved)
        core = ComposedState(x=x, lower=lower_state, estimator=_stored(solver.estimator_at(0).init(x, y)),
                             upper=solver.upper_update().init(x))
        return self.start(core, generator, resolved)

    def sample(self, problem, t, generator) -> ComposedBatches:
        """The lower loop's batches and the estimator's draw, in the order the step uses them."""
        loop, estimator = self.lower_loop(), self.estimator_at(t)
        if self.update_lower_first:
            lower_batches = loop.sample(problem, t, generator)
        draw = draw_for(estimator, problem, generator, self.share_lower_batch)
        if not self.update_lower_first:
            lower_batches = loop.sample(problem, t, generator)
        return ComposedBatches(t, lower_batches, draw)

    def update(self, problem, s: ComposedState, batches: ComposedBatches) -> ComposedState:
        loop, estimator = self.lower_loop(), self.estimator_at(batches.t)
        lower_state = s.lower
        if self.update_lower_first:
            lower_state = loop.update(problem, s.x, lower_state, batches.lower)
        h, estimator_state = estimator(problem, s.x, loop.point(lower_state), _loaded(s.estimator), batches.draw)
        if not self.update_lower_first:
            lower_state = loop.update(problem, s.x, lower_state, batches.lower)
        direction, upper_state = self.upper_update().update(h, s.upper, t=batches.t)
        return ComposedState(x=upper.apply(s.x, direction), lower=lower_state, estimator=_stored(estimator_state),
                             upper=upper_state)

    def point(self, state) -> Tuple[Tree, Tree]:
        core = core_of(state)
        return core.x, self.lower_loop().point(core.lower)

"""The solver contract.

A solver is a dataclass of hyperparameters with two methods that return new states and never
modify their inputs, except that sampling advances the state's ``torch.Generator`` in place
(``solve`` resumes from a copy of it; its generator is a :class:`~bilevel.sampling.RunGenerator`,
which also holds the epoch position of epoch-shuffled mini-batches):

    init(problem, x, y, generator) -> State      (may run warm-start steps on y)
    step(problem, state) -> State                (one outer iteration)

The :class:`State` holds everything needed to continue (x, the lower loop's state, estimator
and upper-update states, the iteration counter and the run's ``torch.Generator``), so a run is
checkpointed with ``torch.save(state)``.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, NamedTuple, Optional, Tuple

import torch

from . import spectrum, upper
from .estimators import draw_for
from .lower import LowerState, warm_start
from .schedules import resolved
from .tree import Tree


class State(NamedTuple):
    x: Tree
    lower: LowerState
    iteration: int
    generator: torch.Generator
    estimator: Any = None
    upper: Any = None
    extra: Any = None
    #: cumulative oracle calls and solver time of the runs that produced this state (set by solve)
    calls: Optional[dict] = None
    elapsed: float = 0.0
    #: step sizes given as "auto", resolved to numbers at init (field name -> value)
    resolved: Optional[dict] = None

    @property
    def y(self) -> Tree:
        return self.lower.y


@dataclasses.dataclass
class Solver(abc.ABC):
    """Base class; subclasses are registered with :func:`bilevel.registry.register_solver`."""

    @abc.abstractmethod
    def init(self, problem, x: Tree, y: Tree, generator: torch.Generator) -> State:
        """The state before the first outer iteration."""

    @abc.abstractmethod
    def step(self, problem, state: State) -> State:
        """One outer iteration."""

    def point(self, state: State) -> Tuple[Tree, Tree]:
        """The (x, y) at which the run is evaluated (an averaged iterate for some solvers)."""
        return state.x, state.lower.y

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


class ComposedSolver(Solver):
    """A solver made of the three parts, one outer iteration being

        y-side:  lower_state <- lower_loop.update(x_t, lower_state)      (before or after h_t)
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
        return State(x=x, lower=lower_state, iteration=0, generator=generator,
                     estimator=solver.estimator_at(0).init(x, y), upper=solver.upper_update().init(x),
                     resolved=resolved)

    def step(self, problem, s: State) -> State:
        solver = self.with_resolved(s)
        loop, estimator = solver.lower_loop(), solver.estimator_at(s.iteration)
        lower_state = s.lower
        if self.update_lower_first:
            lower_state = loop.update(problem, s.x, lower_state, s.generator, s.iteration)
        sample = draw_for(estimator, problem, s.generator, self.share_lower_batch)
        h, estimator_state = estimator(problem, s.x, loop.point(lower_state), s.estimator, sample)
        if not self.update_lower_first:
            lower_state = loop.update(problem, s.x, lower_state, s.generator, s.iteration)
        direction, upper_state = solver.upper_update().update(h, s.upper)
        return s._replace(x=upper.apply(s.x, direction), lower=lower_state, estimator=estimator_state,
                          upper=upper_state, iteration=s.iteration + 1)

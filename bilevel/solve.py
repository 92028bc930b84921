"""The outer loop: run a solver on a problem, evaluate, count, time, report.

    result = solve(problem, "soba", steps=1000, seed=0, eval_every=100, upper_lr=0.05)

Time is measured for solver steps only (evaluation excluded). Every evaluation record holds the
iteration, the cumulative solver time, the cumulative oracle counts and the problem's metrics.
A NaN or inf in x or y stops the run with :class:`NonFiniteError`; callbacks have already
received every earlier record, so files they wrote stay intact.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from . import tree
from .linear_system import truncation_warnings
from .oracles import OracleCounts, count_calls
from .problem import BilevelProblem, validate
from .registry import check_options, make_problem, make_solver
from .solver import Solver, State
from .tree import Tree


class NonFiniteError(FloatingPointError):
    """The iterates became NaN or inf."""


class Callback:
    """Hooks called by :func:`solve`; override what you need."""

    def on_start(self, info: Dict[str, Any]) -> None:
        """Before the first step: problem, solver and hyperparameters."""

    def on_step(self, iteration: int) -> None:
        """After each solver step."""

    def on_eval(self, record: Dict[str, Any]) -> None:
        """After each evaluation (including iteration 0 and the last one)."""

    def on_end(self, result: "Result") -> None:
        """After the run (not called when it fails)."""

    def on_error(self, error: BaseException) -> None:
        """When the run fails (after on_start); records already passed to on_eval are final."""


@dataclasses.dataclass
class Result:
    """What a run produced."""
    x: Tree
    y: Tree
    history: List[Dict[str, Any]]
    counts: OracleCounts
    iterations: int
    wall_time: float
    state: State
    solver: str
    problem: str
    hyperparameters: Dict[str, Any]

    @property
    def final(self) -> Dict[str, Any]:
        """The last evaluation record."""
        return self.history[-1] if self.history else {}

    def metric(self, name: str) -> List[float]:
        """The values of one metric over the evaluations."""
        return [r[name] for r in self.history if name in r]


def _resolve_solver(solver: Union[str, Solver], hyperparameters: Dict[str, Any]) -> Solver:
    if isinstance(solver, str):
        return make_solver(solver, **hyperparameters)
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a registered name or a Solver instance, got {type(solver).__name__}")
    if hyperparameters:
        check_options(type(solver), hyperparameters, f"solver {type(solver).__name__}")
        solver = dataclasses.replace(solver, **hyperparameters)
    return solver


def _solver_name(solver: Solver) -> str:
    return getattr(type(solver), "registry_name", type(solver).__name__)


def _evaluate(problem, solver: Solver, state: State, elapsed: float, counts: OracleCounts) -> Dict[str, Any]:
    x, y = solver.point(state)
    metrics = problem.evaluate(tree.detach(x), tree.detach(y))
    record = {"iteration": state.iteration, "time": elapsed, **{f"calls/{k}": v for k, v in counts.items()},
              "calls/total": counts.total}
    record.update({k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in metrics.items()})
    return record


def _run_loop(problem, solver, state, steps, eval_every, callbacks, counts, history, elapsed, label):
    """The loop proper: appends evaluation records to ``history``; returns (state, elapsed).
    Records count from the state's cumulative calls and time (non-zero when resuming)."""
    earlier_calls = state.calls

    def evaluate_and_report():
        history.append(_evaluate(problem, solver, state, elapsed, counts + earlier_calls))
        for cb in callbacks:
            cb.on_eval(history[-1])

    evaluate_and_report()
    for t in range(steps):
        started = time.perf_counter()
        state = solver.step(problem, state)
        elapsed += time.perf_counter() - started
        if not (tree.all_finite(state.x) and tree.all_finite(state.lower.y)):
            raise NonFiniteError(
                f"{label}: x or y became NaN/inf at iteration {state.iteration} "
                f"(hyperparameters {solver.hyperparameters()}); try smaller step sizes")
        for cb in callbacks:
            cb.on_step(state.iteration)
        if (t + 1) % eval_every == 0 or t + 1 == steps:
            evaluate_and_report()
    return state, elapsed


def solve(problem: Union[str, BilevelProblem], solver: Union[str, Solver] = "soba", steps: int = 1000, *,
          seed: int = 0, eval_every: Optional[int] = None, callbacks: Sequence[Callback] = (),
          progress: bool = False, state: Optional[State] = None, **hyperparameters) -> Result:
    """Run ``solver`` on ``problem`` for ``steps`` outer iterations.

    Args:
        problem: a :class:`BilevelProblem` or a registered problem name (default options).
        solver: a registered solver name or a :class:`~bilevel.solver.Solver` instance.
        steps: number of outer iterations.
        seed: seeds the run's ``torch.Generator`` (initial point and every sample).
        eval_every: evaluate every this many iterations (default: about 20 evaluations); the
            initial and final points are always evaluated.
        callbacks: :class:`Callback` objects (JSONL writer, W&B, progress bar, ...).
        progress: show a progress bar with the latest metrics.
        state: continue from a previous run's ``Result.state`` instead of initializing (``seed``
            is then unused; the state's generator is copied, so the same state can be resumed
            twice). Iterations, oracle counts and time in the records continue from the state's;
            ``Result.iterations`` and ``Result.wall_time`` cover this call only.
        **hyperparameters: solver options, e.g. ``upper_lr=0.05``; unknown names raise TypeError.
    """
    if isinstance(problem, str):
        problem = make_problem(problem)
    solver = _resolve_solver(solver, hyperparameters)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    eval_every = eval_every or max(1, steps // 20)
    callbacks = list(callbacks)
    if progress:
        from .logging import ProgressBar
        callbacks.append(ProgressBar(steps))
    name, problem_name = _solver_name(solver), getattr(problem, "name", type(problem).__name__)

    generator = torch.Generator().manual_seed(seed)
    history: List[Dict[str, Any]] = []
    elapsed = state.elapsed if state is not None else 0.0
    started_at = elapsed
    with count_calls() as counts, truncation_warnings():  # a truncated-CG warning at most once per run
        if state is None:
            x0, y0 = problem.init(generator)
            validate(problem, x0, y0, generator)
            started = time.perf_counter()
            state = solver.init(problem, x0, y0, generator)
            elapsed += time.perf_counter() - started
        else:  # continue on a copy of the generator: the caller's state stays a valid checkpoint
            resumed = torch.Generator(device=state.generator.device)
            resumed.set_state(state.generator.get_state())
            state = state._replace(generator=resumed)
        for cb in callbacks:
            cb.on_start({"problem": problem_name, "solver": name, "steps": steps, "seed": seed,
                         "hyperparameters": solver.hyperparameters()})
        first = state.iteration
        try:
            state, elapsed = _run_loop(problem, solver, state, steps, eval_every, callbacks, counts, history,
                                elapsed, f"{name} on {problem_name}")
        except BaseException as error:
            for cb in callbacks:
                cb.on_error(error)
            raise
        final_counts = OracleCounts(counts)
    state = state._replace(calls=dict(final_counts + state.calls), elapsed=elapsed)
    x, y = solver.point(state)
    result = Result(x=x, y=y, history=history, counts=final_counts, iterations=state.iteration - first,
                    wall_time=elapsed - started_at, state=state, solver=name, problem=problem_name,
                    hyperparameters=solver.hyperparameters())
    for cb in callbacks:
        cb.on_end(result)
    return result

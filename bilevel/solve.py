"""The outer loop: run a solver on a problem, evaluate, count, time, report.

    result = solve(problem, "soba", steps=1000, seed=0, eval_every=100, upper_lr=0.05)

Time is measured for solver steps only (evaluation excluded). Every evaluation record holds the
iteration, the cumulative solver time, the cumulative oracle counts and the problem's metrics.
Evaluations fall on iterations that are multiples of ``eval_every`` (counted from the start of
the run, also when resuming) and on the last one.

A NaN or inf in x or y stops the run with :class:`NonFiniteError` naming the variable and the
iteration; callbacks have already received every earlier record, so files they wrote stay
intact. Whatever stops a run (that error, Ctrl-C, a signal turned into an exception) carries the
last good state, resumable, as ``error.state`` (a :class:`~bilevel.solver.State`, the run
record around the solver's typed tensor state, whose generator is where it was after that
iteration). Every ``checkpoint_every`` iterations (default:
at every evaluation) callbacks get the resumable state through :meth:`Callback.on_checkpoint`.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from . import distributed, tree
from .linear_system import truncation_warnings
from .oracles import OracleCounts, count_calls, second_order_mode
from .problem import BilevelProblem, ProblemError, validate
from .registry import check_options, make_problem, make_solver
from .sampling import copy_generator, run_generator
from .solver import Solver, State
from .tree import Tree


class NonFiniteError(FloatingPointError):
    """The iterates became NaN or inf (the message names the variable and the iteration)."""


class Callback:
    """Hooks called by :func:`solve`; override what you need."""

    def on_start(self, info: Dict[str, Any]) -> None:
        """Before the first step: problem, solver and hyperparameters."""

    def on_step(self, iteration: int) -> None:
        """After each solver step."""

    def on_eval(self, record: Dict[str, Any]) -> None:
        """After each evaluation (including iteration 0 and the last one)."""

    def on_checkpoint(self, state: State) -> None:
        """Every ``checkpoint_every`` iterations: a state from which the run can be resumed
        exactly (cumulative calls and time filled in, its own copy of the generator)."""

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


def metric_values(problem, metrics) -> Dict[str, Any]:
    """``problem.evaluate``'s output as numbers; :class:`ProblemError` naming the metric when a
    value is not a number or a one-element tensor."""
    label = f"problem {getattr(problem, 'name', type(problem).__name__)!r}"
    if not isinstance(metrics, dict):
        raise ProblemError(f"{label}: evaluate(x, y) must return a dict of metric name: number, "
                           f"got {type(metrics).__name__}")
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ProblemError(f"{label}: evaluate(x, y) returned metric {key!r} as a tensor of shape "
                                   f"{tuple(value.shape)}; each metric must be a number or a one-element tensor")
            value = float(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        out[str(key)] = value
    return out


def _evaluate(problem, solver: Solver, state: State, elapsed: float, counts: OracleCounts) -> Dict[str, Any]:
    x, y = solver.point(state)
    if distributed.active():  # once, on rank 0 (whole batches, no collective), sent to every rank
        metrics = None
        if distributed.is_main():
            with distributed.whole_batches():
                metrics = metric_values(problem, problem.evaluate(tree.detach(x), tree.detach(y)))
        metrics = distributed.broadcast_object(metrics)
    else:
        metrics = metric_values(problem, problem.evaluate(tree.detach(x), tree.detach(y)))
    record = {"iteration": state.iteration, "time": elapsed, **{f"calls/{k}": v for k, v in counts.items()},
              "calls/total": counts.total}
    record.update(metrics)
    return record


def _non_finite(label: str, state: State) -> Optional[str]:
    """A message naming the first variable with NaN/inf entries, or None."""
    for side, variables in (("x", state.x), ("y", state.y)):
        for key, value in variables.items():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                kind = "NaN" if bool(torch.isnan(value).any()) else "inf"
                return (f"{label}: iterate {side}[{key!r}] became {kind} ({int((~finite).sum())} of "
                        f"{value.numel()} entries) at iteration {state.iteration}")
    return None


def _resumable(state: State, generator: torch.Generator, calls: OracleCounts, elapsed: float) -> State:
    """A copy of ``state`` with cumulative calls and time, and its own copy of ``generator`` (the
    run's generator as it was right after that iteration: random state and epoch positions)."""
    return state._replace(generator=copy_generator(generator), calls=dict(calls), elapsed=elapsed)


def _synchronizer(device: torch.device):
    """A function that waits for ``device``'s queued work (CUDA runs asynchronously: a step's
    time is only known once its kernels finished); a no-op on the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _run_loop(problem, solver, state, steps, eval_every, checkpoint_every, callbacks, counts, history, elapsed,
              label, initial_eval=True, sync=lambda: None, step=None):
    """The loop proper: appends evaluation records to ``history``; returns (state, elapsed).
    ``step(state) -> state`` is one outer iteration (default: ``solver.step`` on ``problem``).
    Records count from the state's cumulative calls and time (non-zero when resuming). On any
    exception the last good resumable state is attached to it as ``error.state``."""
    step = step or (lambda s: solver.step(problem, s))
    earlier_calls = OracleCounts(state.calls or {})
    good, good_generator, good_elapsed = state, copy_generator(state.generator), elapsed
    good_calls = counts + earlier_calls

    def evaluate_and_report():
        history.append(_evaluate(problem, solver, state, elapsed, counts + earlier_calls))
        for cb in callbacks:
            cb.on_eval(history[-1])

    def checkpoint():
        resumable = _resumable(state, good_generator, good_calls, elapsed)
        for cb in callbacks:
            cb.on_checkpoint(resumable)

    try:
        if initial_eval:
            evaluate_and_report()
        for t in range(steps):
            started = time.perf_counter()
            state = step(state)  # sample from the run's generator, then the pure update
            sync()
            elapsed += time.perf_counter() - started
            problem_found = _non_finite(label, state)
            if problem_found:
                raise NonFiniteError(f"{problem_found} (hyperparameters {solver.hyperparameters()}); "
                                     "try smaller step sizes")
            good, good_generator, good_elapsed = state, copy_generator(state.generator), elapsed
            good_calls = counts + earlier_calls
            for cb in callbacks:
                cb.on_step(state.iteration)
            final = t + 1 == steps
            if state.iteration % eval_every == 0 or final:
                evaluate_and_report()
            if checkpoint_every and (state.iteration % checkpoint_every == 0 or final):
                checkpoint()
    except BaseException as error:
        error.state = _resumable(good, good_generator, good_calls, good_elapsed)
        raise
    return state, elapsed


def _place(problem, device):
    """``(problem, run device)``: a problem name built on ``device`` (None: cuda when available,
    else cpu); a problem object moved there (None: it stays where it is)."""
    from .device import problem_device, resolve_device, to_device
    if isinstance(problem, str):
        problem = make_problem(problem, device=device)
    elif device is not None:
        problem = to_device(problem, device)
    return problem, (resolve_device(device) if device is not None else problem_device(problem))


def solve(problem: Union[str, BilevelProblem], solver: Union[str, Solver] = "soba", steps: int = 1000, *,
          seed: int = 0, eval_every: Optional[int] = None, callbacks: Sequence[Callback] = (),
          progress: bool = False, state=None, checkpoint_every: Optional[int] = None,
          initial_eval: bool = True, hvp_mode: Optional[str] = None, device=None, compile: Optional[bool] = None,
          seeds: Optional[Sequence[int]] = None, grid: Optional[Dict[str, Sequence[float]]] = None,
          cuda_graph: bool = False, **hyperparameters) -> Result:
    """Run ``solver`` on ``problem`` for ``steps`` outer iterations.

    Args:
        problem: a :class:`BilevelProblem` or a registered problem name (default options).
        solver: a registered solver name or a :class:`~bilevel.solver.Solver` instance.
        steps: number of outer iterations (more, when resuming).
        seed: seeds the run's generator (initial point and every sample), a
            :class:`~bilevel.sampling.RunGenerator` that also keeps the epoch position of
            epoch-shuffled mini-batches, so a resumed run continues mid-epoch.
        eval_every: evaluate at every iteration that is a multiple of this (default: about 20
            evaluations); the initial and final points are always evaluated.
        callbacks: :class:`Callback` objects (JSONL writer, W&B, progress bar, checkpoints, ...).
        progress: show a progress bar with the latest metrics.
        state: continue from a previous run: a ``Result.state``, or a
            :class:`~bilevel.checkpoint.Checkpoint` from :func:`bilevel.load_checkpoint`, which
            is first checked to belong to this solver (name and options), this problem and this
            library version (:class:`~bilevel.checkpoint.CheckpointMismatch` names the
            difference). ``seed`` is then unused; the state's generator is copied, so the same
            state can be resumed twice. Iterations, oracle counts and time in the records
            continue from the state's; ``Result.iterations`` and ``Result.wall_time`` cover
            this call only.
        checkpoint_every: call :meth:`Callback.on_checkpoint` every this many iterations and at
            the end (default: at every evaluation; 0: never).
        initial_eval: evaluate the starting point (False when resuming a run whose records
            already hold it).
        hvp_mode: "reverse" or "forward": how every Hessian-vector and cross product of the run
            is taken (:func:`bilevel.oracles.second_order_mode`; an estimator built with its own
            ``hvp_mode`` keeps it); None: reverse, or the enclosing block's.
        device: where the run happens ("cpu", "cuda", "cuda:N"; under torchrun "cuda" is the
            rank's GPU, ``cuda:LOCAL_RANK``). A problem name is built there
            (None: cuda when available, else cpu); a problem object is moved there
            (:meth:`~bilevel.problem.BilevelProblem.to`; None: it stays where it is). The run's
            generator is created on that device; step times wait for the device's queued work.
        compile: run the solver step through ``torch.compile`` (:mod:`bilevel.compiled`): the
            batches are drawn eagerly, the update compiled; results equal the eager run's up to
            floating-point rounding. A step that cannot be traced runs eagerly, with one
            :class:`~bilevel.compiled.CompileFallback` warning naming the reason. None (the
            default): False for one run; for seeds/grid runs, the vmapped update is compiled
            when ``steps`` >= :data:`bilevel.many_compile.AUTO_STEPS` (:mod:`bilevel.many_compile`).
        cuda_graph: seeds/grid runs on a CUDA device only: capture the vmapped update in CUDA
            graphs and replay them (:mod:`bilevel.many_graph`); a ValueError on any other device
            or without seeds/grid.
        seeds, grid: many runs in one process (:mod:`bilevel.many`): one copy per seed (a list)
            and per point of ``grid`` (step-size field -> list of values), batched with
            torch.func.vmap; returns a :class:`bilevel.many.Runs` (one Result per copy) instead
            of a Result. ``grid`` alone runs the grid with ``seed``. Not combined with
            ``callbacks``, ``progress``, ``state`` or ``checkpoint_every``.
        **hyperparameters: solver options, e.g. ``upper_lr=0.05``; unknown names raise TypeError.

    Under torchrun (``WORLD_SIZE`` > 1) the run is data parallel (:mod:`bilevel.distributed`):
    every rank computes the single-process step; evaluations run on rank 0 and their records
    reach every rank; callbacks run on rank 0 only (those with a true ``all_ranks``
    attribute on every rank), so only rank 0 writes files.
    """
    if seeds is not None or grid:
        from .many import solve_many
        for key, value, default in (("callbacks", callbacks, ()), ("progress", progress, False),
                                    ("state", state, None), ("checkpoint_every", checkpoint_every, None),
                                    ("initial_eval", initial_eval, True)):
            if value != default and not (key == "callbacks" and not list(value)):
                raise ValueError(f"{key} is not supported with seeds/grid (many runs in one process); "
                                 f"run one seed at a time for it")
        return solve_many(problem, solver, steps, seeds=[seed] if seeds is None else seeds, grid=grid,
                          eval_every=eval_every, hvp_mode=hvp_mode, device=device, compile=compile,
                          cuda_graph=cuda_graph, **hyperparameters)
    if cuda_graph is not False:
        raise ValueError(f"cuda_graph={cuda_graph!r} applies to batched runs only (seeds=[...] or grid=...), "
                         f"whose vmapped update it captures; this is one run")
    compile = False if compile is None else compile
    from .checkpoint import Checkpoint, check_compatible
    from .device import same_device
    if distributed.setup(device):
        device = distributed.rank_device(device)
        distributed.check_same([seed, steps], "solve(): seed and steps")
    problem, run_device = _place(problem, device)
    solver = _resolve_solver(solver, hyperparameters)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    for key, value, minimum in (("eval_every", eval_every, 1), ("checkpoint_every", checkpoint_every, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise ValueError(f"{key} must be an integer >= {minimum} (or None for the default), got {value!r}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    eval_every = eval_every or max(1, steps // 20)
    checkpoint_every = eval_every if checkpoint_every is None else checkpoint_every
    callbacks = [cb for cb in callbacks if distributed.is_main() or getattr(cb, "all_ranks", False)]
    if progress and distributed.is_main():
        from .logging import ProgressBar
        callbacks.append(ProgressBar(steps))
    name, problem_name = _solver_name(solver), getattr(problem, "name", type(problem).__name__)
    if isinstance(state, Checkpoint):
        check_compatible(state, solver=solver, problem=problem)
        state = state.state

    if state is not None and not same_device(state.generator.device, run_device):
        raise ValueError(f"state: its generator is on {state.generator.device} but this run is on {run_device}; "
                         f"resume on the device it was saved on (device={str(state.generator.device)!r})")
    generator = run_generator(seed, run_device)
    history: List[Dict[str, Any]] = []
    elapsed = state.elapsed if state is not None else 0.0
    started_at = elapsed
    with second_order_mode(hvp_mode), count_calls() as counts, truncation_warnings():  # a truncated-CG warning at most once per run
        if state is None:
            x0, y0 = problem.init(generator)
            validate(problem, x0, y0, copy_generator(generator))  # a copy: the run wastes no draw
            started = time.perf_counter()
            state = solver.init(problem, x0, y0, generator)
            elapsed += time.perf_counter() - started
        else:  # continue on a copy of the generator: the caller's state stays a valid checkpoint
            state = state._replace(generator=copy_generator(state.generator))
        for cb in callbacks:
            cb.on_start({"problem": problem_name, "solver": name, "steps": steps, "seed": seed,
                         "hyperparameters": solver.hyperparameters()})
        first = state.iteration
        step = None
        if compile:
            from .compiled import compiled_step
            step = compiled_step(solver, problem)
        try:
            state, elapsed = _run_loop(problem, solver, state, steps, eval_every, checkpoint_every, callbacks,
                                       counts, history, elapsed, f"{name} on {problem_name}", initial_eval,
                                       _synchronizer(run_device), step)
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

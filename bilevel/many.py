"""Many runs in one process: seeds and a step-size grid batched with ``torch.func.vmap``.

    runs = bilevel.solve("quadratic", "soba", steps=500, seeds=[0, 1, 2],
                         grid={"upper_lr": [0.01, 0.1], "lower_lr": [0.1, 0.5]})
    runs.get(seed=1, upper_lr=0.1, lower_lr=0.5).final      # one copy's Result
    runs.summary("val_loss")                                # mean +- std over seeds per grid point

A *copy* is one (grid point, seed) pair; the copies are ordered grid point by grid point, seeds
inside (``itertools.product`` of the grid's values in the order of its keys). Copy k is exactly
the lone run ``solve(problem, solver, steps, seed=seed_k, **point_k)``:

* it has its own run generator, seeded as the lone run's (:func:`bilevel.sampling.run_generator`),
  its own initial point ``problem.init(generator)`` and its own ``solver.init`` (warm starts and
  "auto" steps are computed per copy, outside vmap);
* every outer iteration t, each copy draws its batches with ``solver.sample(problem, t, its
  generator)``, outside the vmapped function, in the order the lone run draws them;
* the copies' typed states and batches are stacked along a new dimension 0 and ONE
  ``torch.func.vmap(solver.update)`` call advances them all (the update is pure,
  :mod:`bilevel.solver`). Step sizes that differ between copies (the grid's fields, or "auto"
  steps resolved differently per copy) enter the update as 0-dim tensors, one per copy
  (:class:`BatchedStep`); equal ones stay Python numbers. In float64 each copy then equals the
  lone run to rounding (tests/test_many.py checks 1e-10).

When the copies' batches cannot all be stacked at an iteration (different non-tensor values
such as a randomized Neumann term q or SAGA's block index, or different shapes such as a last,
smaller block), the copies are split into groups whose batches stack and each group gets its
own vmapped call (``Runs.note`` counts those iterations). When the vmapped update itself raises
(a solver that reads a tensor in Python, e.g. CG's checks; one that makes autograd leaves, ITD;
a step size that must be a Python number), the run continues as a loop over copies (each
copy's ``update`` on its own state) from that iteration on, with ONE :class:`LoopFallback`
warning saying why (``Runs.batched`` is then False and ``Runs.reason`` holds the message).

Speed. The eager vmapped update costs a fixed amount of Python work per call (torch.func's
transforms under vmap), so ``compile=True`` runs it through ``torch.compile``
(:mod:`bilevel.many_compile`; ``compile=None``, the default, only for runs of at least
``many_compile.AUTO_STEPS`` steps, because the compilation costs tens of seconds to minutes), and
on a CUDA device ``cuda_graph=True`` captures it in CUDA graphs and replays them
(:mod:`bilevel.many_graph`). Both keep the copies' batches drawn outside and each copy equal to
its lone run; a failure to compile or capture warns once and continues with the eager update.
(Expressing the oracles as one eager autograd graph over the stacked copies, instead of
torch.func transforms under vmap, was measured too: no faster, 24 vs 20 ms for 16 SOBA copies,
since the losses must still be vmapped and their decompositions dominate.)

Non-finite iterates stop only the copy they occur in: its record gets ``error`` (the message
:class:`~bilevel.solve.NonFiniteError` would carry, with the iteration) and its history ends at
its last finite evaluation; the other copies go on (a grid point that diverges does not end the
grid search).

Records. Each copy's history has the lone run's fields (iteration, time, ``calls/*``, metrics).
``time`` is the wall-clock time of the batch: all copies advance together, so each copy is
charged the whole batched step (plus its own ``init``). Oracle calls are each copy's own (a
vmapped update counts the calls of one copy).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import statistics
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from . import many_compile, many_graph, schedules
from .compiled import CompileFallback
from .linear_system import truncation_warnings
from .oracles import OracleCounts, count_calls, second_order_mode
from .problem import validate
from .sampling import copy_generator, run_generator
from .solver import Solver, State


class LoopFallback(UserWarning):
    """Some or all iterations of a batched run ran as a loop over copies (the message says why)."""


class BatchedStep:
    """A step size whose value is a tensor (inside vmap: one 0-dim value per copy):
    ``lr_t = value / (t + 1)^exponent``, the tensor form of a number c with the solver's
    ``<field>_decay`` exponent e (:func:`bilevel.schedules.decayed`). A callable, so that
    :func:`bilevel.schedules.at` resolves it and ``decayed`` leaves it as it is."""

    def __init__(self, value: torch.Tensor, exponent: float = 0.0):
        self.value, self.exponent = value, exponent

    def __call__(self, t: int):
        return self.value / (t + 1) ** self.exponent if self.exponent else self.value

    def __repr__(self):
        return f"BatchedStep({self.value!r}, exponent={self.exponent})"


# -- checks and the grid ----------------------------------------------------------------------------

def check_seeds(seeds: Any) -> List[int]:
    """A non-empty list of distinct non-negative integers, else ValueError naming the rule."""
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise ValueError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seeds: each seed must be an integer >= 0, got {seed!r} in {list(seeds)!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)!r}")
    return list(seeds)


def grid_points(solver: Solver, grid: Optional[Dict[str, Sequence[float]]]) -> List[Dict[str, float]]:
    """The grid's points (dicts field -> value), the product of its lists in key order; ``[{}]``
    without a grid. Keys must be step-size fields (``*_lr``) of ``solver``; values non-empty lists
    of positive numbers (ValueError naming the field and the value otherwise)."""
    if not grid:
        return [{}]
    if not isinstance(grid, dict):
        raise ValueError(f"grid must be a mapping of step-size field -> list of values, got {grid!r}")
    fields = schedules.step_size_fields(solver)
    lists = []
    for name, values in grid.items():
        if name not in fields:
            raise ValueError(f"grid.{name}: not a step-size field of solver {type(solver).__name__} "
                             f"(grids are over {fields})")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"grid.{name} must be a non-empty list of positive numbers, got {values!r}")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"grid.{name}: every value must be a positive number, got {value!r}")
        lists.append([float(v) for v in values])
    return [dict(zip(grid, combination)) for combination in itertools.product(*lists)]


# -- stacking trees ---------------------------------------------------------------------------------

class Unstackable(ValueError):
    """The copies' trees differ in structure, in a non-tensor leaf or in a tensor's shape."""


def stack(trees: Sequence[Any]):
    """(leaves, spec) of the trees stacked along a new dim 0: tensor leaves stacked, non-tensor
    leaves (the iteration t, a Neumann term q) kept when they agree; :class:`Unstackable` naming
    the first difference otherwise."""
    flats = [tree_flatten(t) for t in trees]
    spec = flats[0][1]
    if any(f[1] != spec for f in flats):
        raise Unstackable("the copies' trees differ in structure")
    leaves = []
    for i, column in enumerate(zip(*(f[0] for f in flats))):
        if isinstance(column[0], torch.Tensor):
            shapes = {tuple(c.shape) for c in column}
            if len(shapes) > 1:
                raise Unstackable(f"leaf {i} has different shapes across copies: {sorted(shapes)}")
            leaves.append(torch.stack(column))
        elif all(c == column[0] for c in column):
            leaves.append(column[0])
        else:
            raise Unstackable(f"leaf {i} is a non-tensor value that differs across copies: {list(column)[:4]}...")
    return leaves, spec


def unstack(stacked: Any, count: int) -> List[Any]:
    """The ``count`` trees of a tree whose tensor leaves are stacked along dim 0."""
    return [tree_map(lambda v, k=k: v[k] if isinstance(v, torch.Tensor) else v, stacked) for k in range(count)]


def with_fields(solver: Solver, values: Dict[str, Any]) -> Solver:
    """A shallow copy of ``solver`` with ``values`` set as they are (no ``__post_init__``
    validation: a tensor step is not a number it could check)."""
    out = copy.copy(solver)
    for name, value in values.items():
        object.__setattr__(out, name, value)
    return out


def vmapped_update(problem, template: Solver, steps: Dict[str, torch.Tensor], cores: Any, batches: Sequence[Any]):
    """One vmapped ``template.update`` over the stacked typed states ``cores`` (a tree whose
    tensor leaves have the copies along dim 0) and the copies' ``batches`` (stacked here;
    :class:`Unstackable` when they cannot be). ``steps``: field -> tensor of per-copy values,
    set as :class:`BatchedStep` inside the vmapped function."""
    return vmapped_stacked(problem, template, steps, cores, tree_unflatten(*stack(batches)))


def vmapped_stacked(problem, template: Solver, steps: Dict[str, torch.Tensor], cores: Any, batches: Any):
    """:func:`vmapped_update` on batches already stacked (:func:`stack`): a tree whose tensor
    leaves have the copies along dim 0 and whose other leaves the copies share."""
    leaves, spec = tree_flatten(batches)
    tensor_at = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    exponents = {name: getattr(template, name + "_decay", 0.0) or 0.0 for name in steps}

    def one(step_values, core, *tensors):
        full = list(leaves)
        for i, v in zip(tensor_at, tensors):
            full[i] = v
        solver = with_fields(template, {n: BatchedStep(v, exponents[n]) for n, v in step_values.items()})
        return solver.update(problem, core, tree_unflatten(full, spec))
    return torch.func.vmap(one)(steps, cores, *[leaves[i] for i in tensor_at])


def _signature(batches: Any):
    leaves, spec = tree_flatten(batches)
    return spec, tuple(("tensor", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else ("value", v)
                       for v in leaves)


def batch_groups(batches: Sequence[Any]) -> List[List[int]]:
    """The copies partitioned by what their batches must share to be stacked (structure,
    tensor shapes, non-tensor values), in order of first appearance."""
    groups: Dict[Any, List[int]] = {}
    for k, b in enumerate(batches):
        groups.setdefault(_signature(b), []).append(k)
    return list(groups.values())


def grouped_update(problem, template: Solver, steps: Dict[str, torch.Tensor], cores: Any, batches: Sequence[Any],
                   groups: List[List[int]], calls: Optional[list] = None, counts: Optional[OracleCounts] = None):
    """:func:`vmapped_update` on each group of copies (:func:`batch_groups`), the stacked result
    put back in copy order. With ``calls`` and ``counts``: each group's oracle calls (one
    vmapped call counts one copy's) are added to ``calls[k]`` of its copies."""
    outputs, order = [], []
    for group in groups:
        index = torch.tensor(group, device=next(iter(tree_flatten(cores)[0])).device)
        sub_cores = tree_map(lambda v: v.index_select(0, index), cores)
        sub_steps = {n: v.index_select(0, index.to(v.device)) for n, v in steps.items()}
        mark = OracleCounts(counts) if counts is not None else None
        outputs.append(vmapped_update(problem, template, sub_steps, sub_cores, [batches[k] for k in group]))
        if calls is not None:
            for k in group:
                calls[k] = calls[k] + (counts - mark)
        order += group
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    flats = [tree_flatten(o) for o in outputs]
    spec = flats[0][1]
    if any(f[1] != spec for f in flats):
        raise Unstackable("the groups' updated states differ in structure")
    leaves = [torch.cat(column).index_select(0, inverse.to(column[0].device)) for column in zip(*(f[0] for f in flats))]
    return tree_unflatten(leaves, spec)


# -- results ----------------------------------------------------------------------------------------

def _result_class():
    from .solve import Result

    @dataclasses.dataclass
    class CopyResult(Result):
        """A :class:`~bilevel.solve.Result` of one copy, with its seed, grid point and error."""
        seed: int = 0
        point: Dict[str, float] = dataclasses.field(default_factory=dict)
        #: the non-finite message when the copy diverged (its history ends before), else None
        error: Optional[str] = None
    return CopyResult


@dataclasses.dataclass
class Runs:
    """The copies of a batched run: ``runs[k]`` is copy k's Result (with ``seed``, ``point`` and
    ``error``), grid point by grid point, seeds inside."""
    results: List[Any]
    seeds: List[int]
    points: List[Dict[str, float]]
    #: True when every iteration ran vmapped; else ``reason`` says why (some) ran as a loop
    batched: bool
    reason: Optional[str]
    #: wall-clock time of the whole batched run (init included)
    wall_time: float
    #: how many iterations had to vmap the copies in several groups, and why (else None)
    note: Optional[str] = None
    #: whether the vmapped update ran compiled to the end (compile=True, bilevel.many_compile)
    compiled: bool = False
    #: wall time of this run's calls that compiled a graph (included in ``wall_time`` and the records' time)
    compile_seconds: float = 0.0
    #: CUDA graphs captured (cuda_graph=True, bilevel.many_graph)
    graphs: int = 0

    def __len__(self):
        return len(self.results)

    def __getitem__(self, k):
        return self.results[k]

    def __iter__(self):
        return iter(self.results)

    def get(self, seed: int, **point) -> Any:
        """The copy with this seed and grid point (KeyError listing the copies otherwise)."""
        for r in self.results:
            if r.seed == seed and r.point == {k: float(v) for k, v in point.items()}:
                return r
        raise KeyError(f"no copy with seed {seed} and point {point}; copies: "
                       f"{[(r.seed, r.point) for r in self.results]}")

    def groups(self) -> List[tuple]:
        """(point, [the point's Results over seeds]) for every grid point."""
        return [(p, [r for r in self.results if r.point == p]) for p in self.points]

    def summary(self, metric: str) -> List[Dict[str, Any]]:
        """Per grid point: the final ``metric`` over seeds as mean, std (sample standard
        deviation; 0 with one seed), n (finite copies) and diverged (copies with an error)."""
        rows = []
        for point, results in self.groups():
            values = [r.final[metric] for r in results if r.error is None and metric in r.final]
            rows.append({"point": point, "mean": statistics.fmean(values) if values else math.nan,
                         "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                         "n": len(values), "diverged": sum(r.error is not None for r in results)})
        return rows

    def best(self, metric: str, mode: str = "min") -> Dict[str, Any]:
        """The summary row of the grid point with the best mean final ``metric`` (``mode``: "min"
        or "max"); points where a copy diverged are skipped."""
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        rows = [r for r in self.summary(metric) if r["n"] and not r["diverged"] and math.isfinite(r["mean"])]
        if not rows:
            raise ValueError(f"no grid point has a finite {metric!r} on every seed")
        return (min if mode == "min" else max)(rows, key=lambda r: r["mean"])


# -- the run ----------------------------------------------------------------------------------------

def _point_solver(base: Solver, point: Dict[str, float]) -> Solver:
    return dataclasses.replace(base, **point) if point else base


def _differing(solvers: List[Solver], names, dtype, device) -> Dict[str, torch.Tensor]:
    """field -> tensor of per-copy values, for the step fields whose values differ across copies
    (ValueError when such values are not all numbers: a schedule cannot be batched)."""
    out = {}
    for name in names:
        values = [getattr(s, name) for s in solvers]
        if all(v == values[0] for v in values):
            continue
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise Unstackable(f"{name} differs across copies and is not a number in each ({values[:3]}...)")
        out[name] = torch.tensor(values, dtype=dtype, device=device)
    return out


def _finite_per_copy(cores, solver: Solver, count: int) -> torch.Tensor:
    """A bool tensor (count,): whether each copy's x and y are all finite (no host sync)."""
    if isinstance(cores, list):
        flags = []
        for core in cores:
            cx, cy = solver.point(core)
            flags.append(torch.stack([torch.isfinite(v).all() for v in (*cx.values(), *cy.values())]).all())
        return torch.stack(flags)
    x, y = solver.point(cores)
    leaves = [*x.values(), *y.values()]
    return torch.stack([torch.isfinite(v).reshape(count, -1).all(1) for v in leaves]).all(0)


def solve_many(problem, solver, steps: int, *, seeds: Sequence[int], grid: Optional[dict] = None,
               eval_every: Optional[int] = None, hvp_mode: Optional[str] = None, device=None,
               vmap: bool = True, compile: Optional[bool] = None, cuda_graph: bool = False,
               **hyperparameters) -> Runs:
    """Run one copy per (grid point, seed), batched with torch.func.vmap (module docstring).

    Args are :func:`bilevel.solve`'s, plus ``seeds`` (a list of distinct integers), ``grid``
    (step-size field -> list of values), ``vmap`` (False: a loop over copies, the reference),
    ``compile`` (the vmapped update through torch.compile, :mod:`bilevel.many_compile`; None:
    only for runs of at least ``many_compile.AUTO_STEPS`` steps) and ``cuda_graph`` (the
    vmapped update captured in CUDA graphs and replayed, :mod:`bilevel.many_graph`; a CUDA
    device only, not with compile=True).
    """
    from .solve import _evaluate, _place, _resolve_solver, _solver_name, _synchronizer
    started_all = time.perf_counter()
    problem, run_device = _place(problem, device)
    base = _resolve_solver(solver, hyperparameters)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if eval_every is not None and (isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1):
        raise ValueError(f"eval_every must be an integer >= 1 (or None for the default), got {eval_every!r}")
    eval_every = eval_every or max(1, steps // 20)
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be True or False, got {cuda_graph!r}")
    if cuda_graph and compile:
        raise ValueError("cuda_graph=True and compile=True: choose one (the graph replays the eager vmapped update; "
                         "a dynamo-compiled update cannot be captured with the guarded integers of bilevel.many_graph)")
    use_compile = not cuda_graph and many_compile.wanted(compile, steps)
    graph_backend = many_graph.backend_for(run_device) if cuda_graph else None  # ValueError off CUDA
    seeds = check_seeds(seeds)
    points = grid_points(base, grid)
    copies = [(point, seed) for point in points for seed in seeds]
    count = len(copies)
    name, problem_name = _solver_name(base), getattr(problem, "name", type(problem).__name__)
    sync = _synchronizer(run_device)
    reasons: List[str] = []
    notes: Dict[str, Any] = {}

    def fall_back(why: str):
        if why not in reasons:
            reasons.append(why)
            warnings.warn(f"{name} on {problem_name}: {why}", LoopFallback, stacklevel=3)

    with second_order_mode(hvp_mode), count_calls() as counts, truncation_warnings():
        generators, states, solvers, calls, elapsed = [], [], [], [], []
        for k, (point, seed) in enumerate(copies):
            generator = run_generator(seed, run_device)
            x0, y0 = problem.init(generator)
            if k == 0:
                validate(problem, x0, y0, copy_generator(generator))
            lone = _point_solver(base, point)
            before, started = OracleCounts(counts), time.perf_counter()
            state = lone.init(problem, x0, y0, generator)
            elapsed.append(time.perf_counter() - started)
            calls.append(counts - before)
            generators.append(generator)
            states.append(state)
            solvers.append(lone.with_resolved(state))
        cores = [s.core for s in states]
        histories: List[List[dict]] = [[] for _ in copies]
        errors: List[Optional[str]] = [None] * count
        step_names = sorted(set(schedules.step_size_fields(base)))
        dtype = next((v.dtype for v in tree_flatten(cores[0].x)[0] if v.is_floating_point()), torch.float32)
        mode = "vmap" if vmap else "loop"
        if not vmap:
            reasons.append("vmap=False")
        try:
            step_values = _differing(solvers, step_names, dtype, run_device)
        except Unstackable as why:
            fall_back(f"step sizes cannot be batched ({why}); every iteration runs as a loop over copies")
            mode = "loop"
        if mode == "vmap":
            try:
                cores = tree_unflatten(*stack(cores))
            except Unstackable as why:
                fall_back(f"the copies' initial states cannot be stacked ({why}); every iteration runs as a loop")
                mode = "loop"
        template = solvers[0]
        batched_step, compiled_update = _batched_step(problem, template, step_values if mode == "vmap" else {},
                                                      use_compile and mode == "vmap", graph_backend, counts)
        alive = torch.ones(count, dtype=torch.bool, device=run_device)
        died_at = torch.full((count,), -1, dtype=torch.int64, device=run_device)

        def evaluate(iteration: int):
            flags = alive.tolist()
            where = died_at.tolist()
            per_copy = cores if mode == "loop" else unstack(cores, count)
            for k in range(count):
                if errors[k] is not None:
                    continue
                if not flags[k]:
                    errors[k] = (f"{name} on {problem_name}: iterates became non-finite at iteration "
                                 f"{where[k]} (seed {copies[k][1]}, point {copies[k][0]})")
                    continue
                state = State(core=per_copy[k], iteration=iteration, generator=generators[k])
                histories[k].append(_evaluate(problem, solvers[k], state, elapsed[k], calls[k]))

        evaluate(0)
        for t in range(steps):
            batches = [s.sample(problem, t, g) for s, g in zip(solvers, generators)]
            started = time.perf_counter()
            before = OracleCounts(counts)
            done = False
            if mode == "vmap":
                saved_calls = list(calls)
                try:
                    try:
                        updated = batched_step(cores, *stack(batches))
                        delta = counts - before
                        calls = [c + delta for c in calls]
                    except Unstackable as why:  # group the copies whose batches stack; one vmap per group
                        groups = batch_groups(batches)
                        updated = grouped_update(problem, template, step_values, cores, batches, groups, calls, counts)
                        first = notes.get("grouped", (0, str(why)))
                        notes["grouped"] = (first[0] + 1, first[1])
                    cores, done = updated, True
                except Exception as error:  # the update cannot be vmapped: loop from here on
                    counts.clear()
                    counts.update(before)
                    calls = saved_calls
                    fall_back(f"the update cannot be vmapped ({type(error).__name__}: {str(error).splitlines()[0]}); "
                              f"iterations from {t} on run as a loop over copies")
                    mode, cores = "loop", unstack(cores, count)
            if not done:
                cores = _loop_update(problem, solvers, cores, batches, calls, counts)
            sync()
            step_time = time.perf_counter() - started
            elapsed = [e + step_time for e in elapsed]
            finite = _finite_per_copy(cores, template, count)
            died_at = torch.where(alive & ~finite, torch.full_like(died_at, t + 1), died_at)
            alive = alive & finite
            iteration = t + 1
            if iteration % eval_every == 0 or iteration == steps:
                evaluate(iteration)
    per_copy = cores if mode == "loop" else unstack(cores, count)
    CopyResult = _result_class()
    results = []
    for k, (point, seed) in enumerate(copies):
        total = OracleCounts(calls[k])
        state = State(core=per_copy[k], iteration=steps, generator=copy_generator(generators[k]), calls=dict(total),
                      elapsed=elapsed[k], resolved=states[k].resolved)
        x, y = solvers[k].point(state)
        results.append(CopyResult(x=x, y=y, history=histories[k], counts=total, iterations=steps,
                                  wall_time=elapsed[k], state=state, solver=name, problem=problem_name,
                                  hyperparameters=solvers[k].hyperparameters(), seed=seed, point=point,
                                  error=errors[k]))
    note = None
    if "grouped" in notes:
        note = (f"{notes['grouped'][0]} of {steps} iterations vmapped the copies in groups (their batches could not "
                f"all be stacked; first case: {notes['grouped'][1]})")
    return Runs(results=results, seeds=seeds, points=points, batched=not reasons, reason="; ".join(reasons) or None,
                wall_time=time.perf_counter() - started_all, note=note,
                compiled=compiled_update is not None and compiled_update.reason is None,
                compile_seconds=compiled_update.run_compile_seconds if compiled_update is not None else 0.0,
                graphs=getattr(batched_step, "graphs", 0))


def _batched_step(problem, template: Solver, step_values: Dict[str, torch.Tensor], use_compile: bool,
                  graph_backend, counts: OracleCounts):
    """(step(cores, leaves, spec) -> cores, the CompiledUpdate or None): the vmapped update of
    the copies on their stacked batches (``leaves``, ``spec``: :func:`stack`'s), eager,
    compiled (:mod:`bilevel.many_compile`) or replayed from CUDA graphs (:mod:`bilevel.many_graph`).
    A compile or capture failure warns once (CompileFallback, GraphFallback) and the run
    continues with the eager vmapped update."""
    def make(solver):
        def update(steps, cores, batches):
            return vmapped_stacked(problem, solver, steps, cores, batches)
        return update
    eager = make(template)
    if graph_backend is not None:
        graphed = many_graph.GraphedStep(lambda cores, batches: eager(step_values, cores, batches), graph_backend, counts)
        return graphed, None
    if not use_compile:
        return (lambda cores, leaves, spec: eager(step_values, cores, tree_unflatten(leaves, spec))), None
    update = many_compile.compiled_update(problem, template, tuple(sorted(step_values)), make)

    def warn(why: str):
        warnings.warn(why, CompileFallback, stacklevel=5)

    def step(cores, leaves, spec):
        return update(step_values, cores, tree_unflatten(leaves, spec), warn)
    return step, update


def _loop_update(problem, solvers, cores, batches, calls, counts):
    """Each copy's own update (the fallback); adds each copy's oracle calls to ``calls[k]``."""
    new = []
    for k, (solver, core, batch) in enumerate(zip(solvers, cores, batches)):
        mark = OracleCounts(counts)
        new.append(solver.update(problem, core, batch))
        calls[k] = calls[k] + (counts - mark)
    return new

"""Compiled solver steps: ``solve(..., compile=True)`` runs each outer iteration through
``torch.compile``.

Each solver splits an outer iteration in two (:mod:`bilevel.batches`):

    batches = solver.sample(problem, t, generator)    eager: every use of the run's generator
    core    = solver.update(problem, core, batches)   compiled: a pure function of the typed state

so the generator never enters the compiled region and a seed draws the same batches compiled or
not. The iteration t reaches the update as ``batches.t``, a Python int.

Second-order oracles (``torch.autograd.grad(create_graph=True)``) are traced by dynamo on
torch 2.13 with ``torch._dynamo.config.trace_autograd_ops = True`` (set for the process by the
first :class:`CompiledStep`; without it dynamo graph-breaks at ``autograd.grad`` and aot_autograd
then refuses the double backward): the whole step, double backward included, is one graph, so no
``torch.func`` path is needed in the oracles. Oracle calls inside that graph
are counted through :data:`bilevel.oracles.DEFERRED` (replayed appends drained after each call).

Recompiles: a Python int that changes between calls (the iteration, a transform's counter) is
specialized on the first compiled call and made dynamic by dynamo at the second (one recompile),
so schedules c / (t + 1)^e cost no further compiles. Recompiles are capped
(``recompile_limit``): past it, or when the step cannot be traced in one graph (a ``.item()``,
data-dependent control flow, an untraceable side effect), the run continues eagerly from the same state and generator, with ONE
:class:`CompileFallback` warning naming the reason. An error that the eager step raises too is a
genuine error and propagates.

Compiled steps are cached by (solver class, its fields, problem object), so runs of several
seeds compile once. Results equal the eager steps' up to floating-point reassociation (the
compiled kernels fuse and reorder operations).
"""
from __future__ import annotations

import collections
import itertools
import re
import time
import types
import warnings
import weakref
from typing import Any, Optional, Tuple

import torch
import torch._dynamo.utils

from . import oracles

#: Most graphs one compiled step may compile before it falls back to eager (the iteration
#: becoming dynamic costs one more; a lower loop with a period one more per branch).
RECOMPILE_LIMIT = 4
#: torch.compile backend of :func:`compiled_step` ("inductor": generated kernels; "aot_eager" or
#: "eager" trace the same graph without code generation, much faster to compile, for tests).
BACKEND = "inductor"
#: Compiled steps kept (a least-recently-used cache over solver settings and problems).
CACHE_SIZE = 16


class CompileFallback(UserWarning):
    """A compiled step could not be traced and the run continues eagerly (once per step cache entry)."""


_CODE_COPIES = itertools.count()


def _own_code(fn):
    """``fn`` with a private, uniquely named copy of its code object: dynamo keeps compiled graphs
    (and counts recompiles) per code object, and remembers which inputs varied (automatic dynamic
    shapes) per code *name and location*; a shared name would make one solver's varying fields
    dynamic in another solver's first graph."""
    name = f"{fn.__name__}_{next(_CODE_COPIES)}"
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _snapshot(generator):
    streams = getattr(generator, "streams", None)
    return generator.get_state(), (dict(streams) if streams is not None else None)


def _restore(generator, snapshot) -> None:
    state, streams = snapshot
    generator.set_state(state)
    if streams is not None:
        generator.streams = streams


def _reason(error: BaseException) -> str:
    """The error's type and first line, and the innermost user frame dynamo reports (``from user
    code:``), e.g. the problem's line that reads a tensor into Python."""
    lines = str(error).splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    where = ""
    if "from user code:" in lines:
        frames = [k for k, line in enumerate(lines) if line.strip().startswith("File ")]
        frames = [k for k in frames if k > lines.index("from user code:")]
        if frames:
            k = frames[-1]
            code = lines[k + 1].strip() if k + 1 < len(lines) else ""
            where = f"; at {lines[k].strip()}" + (f": {code}" if code else "")
    return f"{type(error).__name__}: {first[:240]}{where}"


def _drain_counts() -> None:
    calls, oracles.DEFERRED[:] = list(oracles.DEFERRED), []
    for kind, n in calls:
        oracles._record(kind, n)


class CountedCompiles:
    """Bookkeeping of a compiled callable ``self._compiled``, shared by :class:`CompiledStep` and
    :class:`bilevel.many_compile.CompiledUpdate`: ``compiles`` graphs compiled and the
    ``compile_seconds`` of the calls that compiled them (their step included), overall and in
    the current run (``run_compiles``, ``run_compile_seconds``); past ``recompile_limit`` graphs
    in a run, a RuntimeError (the caller then falls back to eager)."""

    recompile_limit: int

    def _reset_counts(self) -> None:
        self.compile_seconds, self.compiles, self.run_compiles, self.run_compile_seconds = 0.0, 0, 0, 0.0

    def _counted_call(self, *args):
        frames = _compiled_frames()
        started = time.perf_counter()
        out = self._compiled(*args)
        if _compiled_frames() != frames:
            seconds = time.perf_counter() - started
            self.compiles += 1
            self.run_compiles += 1
            self.compile_seconds += seconds
            self.run_compile_seconds += seconds
            if self.run_compiles > self.recompile_limit:
                raise RuntimeError(f"compiled {self.run_compiles} graphs in this run, more than recompile_limit="
                                   f"{self.recompile_limit}{self._last_guard_failure()}")
        return out

    def _last_guard_failure(self) -> str:
        """The guard whose failure caused the last recompile, as dynamo recorded it."""
        failures = [str(f).strip() for f in
                    torch._dynamo.utils.guard_failures.get(self._compiled.__wrapped__.__code__) or []]
        numbered = [(int(m.group(1)), f) for f in failures if (m := re.match(r"\d+/(\d+):", f))]
        if not numbered:
            return " (TORCH_LOGS=recompiles shows the guards that failed)"
        latest = max(numbered)[1].splitlines()[0]  # the newest graph's guard that failed
        return f"; the newest graph's failed guard: {' '.join(latest.split())[:240]}"


class CompiledStep(CountedCompiles):
    """One outer iteration of ``solver`` on ``problem``, compiled; ``step(state) -> state`` on
    the run record (:class:`bilevel.solver.State`), as ``solver.step(problem, state)``.

    ``reason`` is None while compiled, else why it runs eagerly; ``compile_seconds`` the wall
    time of the calls that traced and compiled a graph (their step included); ``compiles`` how
    many graphs were compiled (``run_compiles``: in the current run, capped by
    ``recompile_limit``).
    """

    def __init__(self, solver, problem, *, recompile_limit: int = RECOMPILE_LIMIT, backend: str = "inductor",
                 mode: Optional[str] = None):
        if isinstance(recompile_limit, bool) or not isinstance(recompile_limit, int) or not 1 <= recompile_limit < 8:
            raise ValueError(f"recompile_limit must be an integer from 1 to 7 (dynamo's own limit is 8), "
                             f"got {recompile_limit!r}")
        # Lets dynamo trace torch.autograd.grad (double backward included) into the graph. Set for
        # the process, not per call (a config patch costs 15-60 us, as much as a small step); it
        # only widens what torch.compile traces.
        torch._dynamo.config.trace_autograd_ops = True
        self.solver, self.problem = solver, problem
        self.recompile_limit = recompile_limit
        self.reason: Optional[str] = None
        self._reset_counts()
        self._warned = False
        self._resolved = {}  # the solver with its "auto" steps filled in, per resolved values

        def update(solver, core, batches):
            return solver.update(problem, core, batches)
        self._compiled = torch.compile(_own_code(update), fullgraph=True, backend=backend, mode=mode)

    def resolved_solver(self, state):
        """``solver.with_resolved(state)``, one object per resolved values (a new object per call
        would fail dynamo's guards on it at every step)."""
        if not state.resolved:
            return self.solver
        key = tuple(sorted(state.resolved.items()))
        if key not in self._resolved:
            self._resolved[key] = self.solver.with_resolved(state)
        return self._resolved[key]

    # -- the step ------------------------------------------------------------------------------

    def __call__(self, state):
        if self.reason is not None:
            return self._eager(state)
        solver, generator = self.resolved_solver(state), state.generator
        snapshot = _snapshot(generator)
        batches = solver.sample(self.problem, state.iteration, generator)
        oracles.DEFERRED.clear()
        try:
            core = self._counted_call(solver, state.core, batches)
        except Exception as error:  # not traceable: this step and the rest of the run eagerly
            oracles.DEFERRED.clear()
            _restore(generator, snapshot)
            new_state = self._eager(state)  # a genuine error raises here
            self._fall_back(_reason(error))
            return new_state
        _drain_counts()
        return state._replace(core=core, iteration=state.iteration + 1)

    def _eager(self, state):
        return self.solver.step(self.problem, state)

    def _fall_back(self, reason: str) -> None:
        self.reason = reason
        if not self._warned:
            self._warned = True
            name = getattr(type(self.solver), "registry_name", type(self.solver).__name__)
            warnings.warn(f"compile=True: {name} on {getattr(self.problem, 'name', type(self.problem).__name__)} "
                          f"runs eagerly, its step could not be compiled ({reason})", CompileFallback, stacklevel=3)


def _compiled_frames() -> int:
    """Graphs dynamo compiled so far in this process (a counter that moves when a call compiles)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


# ---------------------------------------------------------------------------------------------
# The cache: one CompiledStep per (solver class and fields, problem object).

_CACHE: "collections.OrderedDict[Tuple[Any, ...], Tuple[weakref.ref, CompiledStep]]" = collections.OrderedDict()


def compiled_step(solver, problem) -> CompiledStep:
    """The cached :class:`CompiledStep` of an equal solver on this problem object, or a new one.

    A cached step that fell back to eager warns again (one warning per run) and stays eager."""
    key = (type(solver), repr(solver), id(problem), BACKEND)
    entry = _CACHE.get(key)
    if entry is not None and entry[0]() is problem:
        _CACHE.move_to_end(key)
        step = entry[1]
        step._warned, step.run_compiles, step.run_compile_seconds = False, 0, 0.0
        if step.reason is not None:
            step._fall_back(step.reason)
        return step
    step = CompiledStep(solver, problem, backend=BACKEND)
    try:
        ref = weakref.ref(problem)
    except TypeError:  # not weak-referenceable: not cached
        return step
    _CACHE[key] = (ref, step)
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return step


def clear_cache() -> None:
    """Forget every cached compiled step (dynamo's own caches are left alone)."""
    _CACHE.clear()

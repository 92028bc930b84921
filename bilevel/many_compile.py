"""The vmapped update of a batched run through ``torch.compile``: ``solve(..., seeds=[...], compile=True)``.

One eager vmapped update of :mod:`bilevel.many` costs a fixed amount of Python work per call
(torch.func's grad / vjp transforms under vmap, their decompositions, pytree handling), about
the cost of the arithmetic of 16 small copies; this is why 16 vmapped digits hyper-cleaning
copies ran only 1.5-2.5x faster than 16 sequential runs. ``torch.compile`` traces the whole
vmapped update, transforms included, once into one graph (dynamo inlines ``torch.func.vmap``,
``grad`` and ``vjp``; ``trace_autograd_ops`` lets it trace ``torch.autograd.grad`` as well), and
each later step is one call of generated kernels. Measured in one process (bench/README.md):
a 16-copy SOBA update 16-18 ms eager vmapped -> 2-3 ms compiled; BO-REP 180 -> 27 ms.

The price is the compilation, once per (solver settings, problem object, copies' shapes) in a
process: tens of seconds for SOBA on a loaded 2-core CPU, minutes for BO-REP (its periodic lower
loop makes two graphs, and the iteration t becomes dynamic after the first call: one recompile).
Hence ``compile=None`` (the default) compiles only runs of at least :data:`AUTO_STEPS`
iterations; ``compile=True`` always; ``compile=False`` never.

Exactness: the copies' batches are drawn outside (as in every batched run) and the graph
computes the same operations; generated kernels may reorder floating-point sums, so a copy
equals its lone run up to rounding (float64: within 1e-10 over the tests' runs). When the update
cannot be traced in one graph, or needs more than ``recompile_limit`` graphs, the run continues
with the eager vmapped update from the same state, with ONE
:class:`~bilevel.compiled.CompileFallback` warning naming the reason.

Oracle calls inside the graph are counted through :data:`bilevel.oracles.DEFERRED`, as in
:mod:`bilevel.compiled` (one copy's calls per call, as the eager vmapped update counts).
"""
from __future__ import annotations

import collections
import warnings
import weakref
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from . import compiled, oracles

#: ``compile=None`` compiles a batched run's update when the run has at least this many
#: iterations (a 16-copy SOBA update saves about 14 ms per step compiled; its compilation costs
#: 10-20 s on a loaded 2-core CPU: break-even near 1000 steps; BO-REP saves ~150 ms per step for
#: a compilation of 1-5 minutes).
AUTO_STEPS = 1000
#: Compiled batched updates kept (least recently used dropped first).
CACHE_SIZE = 8


def wanted(option: Optional[bool], steps: int) -> bool:
    """Whether a batched run compiles its update: ``option`` when it is a bool, else (None)
    whether ``steps >= AUTO_STEPS``; a TypeError for anything else."""
    if option is None:
        return steps >= AUTO_STEPS
    if not isinstance(option, bool):
        raise TypeError(f"compile must be True, False or None (compile runs of >= {AUTO_STEPS} steps), got {option!r}")
    return option


class CompiledUpdate(compiled.CountedCompiles):
    """``update(cores, batches) -> cores`` of the vmapped update ``fn(steps, cores, batches)``
    (``steps``: the per-copy step tensors, an argument; the solver and problem are closed over),
    compiled; after a failure, the eager ``fallback`` (same signature as ``update``).

    ``reason``: None while compiled, else why it runs eagerly; ``compile_seconds``: wall time
    of the calls that compiled a graph; ``compiles``: graphs compiled (``run_compiles`` and
    ``run_compile_seconds``: in the current run; ``run_compiles`` is capped by ``recompile_limit``)."""

    def __init__(self, fn: Callable[[Dict[str, torch.Tensor], Any, Any], Any], *, backend: str,
                 recompile_limit: int = compiled.RECOMPILE_LIMIT):
        torch._dynamo.config.trace_autograd_ops = True  # as bilevel.compiled: autograd.grad inside the graph
        self.fn, self.recompile_limit = fn, recompile_limit
        self._compiled = torch.compile(compiled._own_code(fn), fullgraph=True, backend=backend)
        self.reason: Optional[str] = None
        self._reset_counts()

    def __call__(self, steps: Dict[str, torch.Tensor], cores: Any, batches: Any, warn: Callable[[str], None]):
        if self.reason is not None:
            return self.fn(steps, cores, batches)
        oracles.DEFERRED.clear()
        try:
            out = self._counted_call(steps, cores, batches)
        except Exception as error:  # not traceable: this step and the rest of the run eagerly
            oracles.DEFERRED.clear()
            out = self.fn(steps, cores, batches)  # a genuine error raises here
            self.reason = compiled._reason(error)
            warn(f"compile=True: the batched update runs eagerly, it could not be compiled ({self.reason})")
            return out
        compiled._drain_counts()
        return out


_CACHE: "collections.OrderedDict[Tuple[Any, ...], Tuple[weakref.ref, CompiledUpdate, Any]]" = collections.OrderedDict()


def compiled_update(problem, template, step_names: Tuple[str, ...],
                    make: Callable[[Any], Callable[[Dict[str, torch.Tensor], Any, Any], Any]]) -> CompiledUpdate:
    """The cached :class:`CompiledUpdate` for an equal solver (by ``repr``), this problem object
    and these batched step fields, else a new one of ``make(template)`` (the vmapped update
    closed over that solver: the cached entry keeps its first solver object, so that dynamo's
    guards on the closed-over solver hold in later runs)."""
    key = (type(template), repr(template), id(problem), tuple(step_names), compiled.BACKEND)
    entry = _CACHE.get(key)
    if entry is not None and entry[0]() is problem:
        _CACHE.move_to_end(key)
        entry[1].run_compiles, entry[1].run_compile_seconds = 0, 0.0
        if entry[1].reason is not None:
            warnings.warn(f"compile=True: the batched update runs eagerly ({entry[1].reason})",
                          compiled.CompileFallback, stacklevel=4)
        return entry[1]
    update = CompiledUpdate(make(template), backend=compiled.BACKEND)
    try:
        _CACHE[key] = (weakref.ref(problem), update, template)
    except TypeError:  # a problem that cannot be weakly referenced: not cached
        return update
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return update


def clear_cache() -> None:
    """Forget every cached compiled batched update."""
    _CACHE.clear()

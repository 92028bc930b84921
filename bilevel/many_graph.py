"""CUDA graph capture of a batched run's step: ``solve(..., seeds=[...], cuda_graph=True)``.

A small step on a GPU is launch-bound: the vmapped update of :mod:`bilevel.many` issues a few
hundred kernels whose launches cost far more than their arithmetic. A CUDA graph records those
kernels once and replays them with one launch. This module captures the vmapped update

    cores' = update(cores, batches)            (pure: bilevel.solver; batches drawn outside)

and replays it, which is correct only if every replay sees what a fresh call would:

* Static buffers. A graph reads and writes fixed memory. Each step copies the stacked states and
  the stacked batch tensors into the graph's input buffers (``copy_``), replays, and returns
  clones of its output buffers (the next replay overwrites them).
* Generators. Nothing random runs inside the graph: every copy's batches are drawn by
  ``solver.sample`` with its own generator before the step (as in every batched run), so the
  random streams are those of the lone runs.
* Python values. A graph freezes every Python-level decision its capture made. The only Python
  values that change between steps are the non-tensor leaves of the batches: the iteration t,
  a Neumann term q, a structure (a skipped lower step). Graphs are kept per structure of the
  batches (tree, tensor shapes and dtypes, non-integer values); integer leaves enter the capture
  as :class:`Guarded` stand-ins that record every operation made with them and its result
  (``t % period -> 0``, ``t + 1 -> 8``, ``float(t)``, ...). A graph is replayed for new integers
  only if repeating each recorded operation on them gives the recorded result (the guards of a
  tracing compiler, on the few integers the step reads). A constant step size never reads t, so
  one graph serves every iteration; BO-REP's ``t % 2`` gives two graphs; a decaying step size
  c / (t + 1)^e reads ``t + 1``, so each iteration would need its own graph: after
  ``max_graphs`` captures the run goes on without capture (one :class:`GraphFallback` warning).
* Oracle counts. A replay runs no Python, so the calls the capture made are added at each
  replay (the warm-up and capture runs themselves are not counted).
* Capture rules. CUDA requires warm-up iterations on a side stream before capturing work that
  uses autograd (PyTorch's "CUDA Graphs" notes); a step that synchronizes with the host (a
  ``.item()``, a data-dependent shape) cannot be captured: the run then goes on without capture,
  with one :class:`GraphFallback` warning naming the error.

The capture itself is a :class:`Backend` (``capture(fn, inputs) -> (replay, outputs)``):
:class:`CudaBackend` on a GPU; tests on CPU use a backend that "replays" by running the captured
Python function again with the integers it was captured with, on whatever the input buffers
hold, which is exactly what a graph would compute (tests/test_many_graph.py).

Reference: PyTorch documentation, "CUDA Graphs" (torch.cuda.graph, warm-up on a side stream,
static inputs and outputs, graph memory pools).
"""
from __future__ import annotations

import abc
import operator
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

#: Most graphs one run captures before it continues without capture.
MAX_GRAPHS = 8


class GraphFallback(UserWarning):
    """A batched run with cuda_graph=True continues without graph capture (the message says why)."""


# -- integers that remember how they were used --------------------------------------------------------

def _unwrap(value, guarded_operands: list):
    """``value``'s integer if it is a :class:`Guarded` (noted in ``guarded_operands``), else ``value``."""
    if isinstance(value, Guarded):
        guarded_operands.append(value)
        return value.value
    return value


class Guarded:
    """Stands for the integer ``value`` while a step is captured; every operation on it (arithmetic,
    comparison, conversion, formatting, attribute) is done on ``value`` and recorded with its
    operands and result in ``uses``. :meth:`holds_for` says whether another integer would give
    the same results, i.e. whether code that ran with this stand-in would run identically with
    that integer. Not an ``int`` subclass on purpose: ``0.5 * t`` would then be computed by
    ``float.__mul__`` without asking this object."""

    __slots__ = ("value", "uses")

    def __init__(self, value: int):
        self.value, self.uses = value, []

    def _use(self, name: str, *args):
        others: List[Guarded] = []
        raw = tuple(_unwrap(a, others) for a in args)
        for other in others:  # an operand that is itself guarded must keep its exact value
            other.uses.append(("exact", (), other.value))
        result = _apply(name, self.value, raw)
        self.uses.append((name, raw, result))
        return result

    def holds_for(self, value: int) -> bool:
        """Whether every recorded use gives the same result with ``value`` in place of this one's."""
        if type(value) is not type(self.value):
            return False
        for name, args, expected in self.uses:
            again = value if name == "exact" else _apply(name, value, args)
            if type(again) is not type(expected) or again != expected:
                return False
        return True

    def __getattr__(self, name):  # anything else (bit_length, real, ...): only this exact value
        self.uses.append(("exact", (), self.value))
        return getattr(self.value, name)


def _apply(name: str, value: int, args: tuple):
    """The operation ``name`` (a key of :data:`_OPERATIONS`) with ``value`` in its integer's place."""
    return _OPERATIONS[name](value, *args)


#: dunder -> how it computes with the integer v (reflected operations put v on the right).
_OPERATIONS = {
    **{f"__{n}__": getattr(operator, n) for n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow",
                                                  "lshift", "rshift", "xor", "eq", "ne", "lt", "le", "gt", "ge")},
    "__and__": operator.and_, "__or__": operator.or_,
    **{f"__r{n}__": (lambda op: lambda v, other: op(other, v))(getattr(operator, n))
       for n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "lshift", "rshift", "xor")},
    "__rand__": lambda v, other: operator.and_(other, v), "__ror__": lambda v, other: operator.or_(other, v),
    "__divmod__": divmod, "__rdivmod__": lambda v, other: divmod(other, v),
    "__neg__": operator.neg, "__pos__": operator.pos, "__abs__": abs, "__invert__": operator.invert,
    "__index__": operator.index, "__int__": int, "__float__": float, "__bool__": bool, "__hash__": hash,
    "__str__": str, "__repr__": repr, "__format__": format, "__round__": round,
    "__trunc__": lambda v: v.__trunc__(), "__floor__": lambda v: v.__floor__(), "__ceil__": lambda v: v.__ceil__(),
}


def _method(name: str):
    def method(self, *args):
        return self._use(name, *args)
    method.__name__ = name
    return method


for _name in _OPERATIONS:
    setattr(Guarded, _name, _method(_name))


# -- backends -----------------------------------------------------------------------------------------

class Backend(abc.ABC):
    """How a step is captured: ``capture(fn, inputs) -> (replay, outputs)``, where ``fn(inputs)``
    returns a list of tensors, ``inputs`` are the static input buffers, ``outputs`` the static
    output buffers that ``replay()`` refills from the current contents of ``inputs``."""

    @abc.abstractmethod
    def capture(self, fn: Callable[[List[torch.Tensor]], List[torch.Tensor]], inputs: List[torch.Tensor]):
        """Capture ``fn`` on ``inputs``: (replay, outputs)."""


class CudaBackend(Backend):
    """``torch.cuda.CUDAGraph`` capture after ``warmup`` runs on a side stream; all graphs of a run
    share one memory pool."""

    def __init__(self, device: torch.device, warmup: int = 3):
        self.device, self.warmup = device, warmup
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, fn, inputs):
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = fn(inputs)
        return graph.replay, outputs


def backend_for(device: torch.device) -> Backend:
    """The capture backend of a run on ``device``: CUDA graphs; ValueError on any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, but this run's device is {str(device)!r}: "
                         f"pass device='cuda' on a machine with a GPU, or cuda_graph=False")
    return CudaBackend(device)


# -- the graphed step ---------------------------------------------------------------------------------

def _structure(leaves: Sequence[Any], spec) -> tuple:
    """What a graph is kept by: the tree structure, each tensor's shape, dtype and device, each
    non-integer value; integers are marked by position only (they are guarded instead)."""
    out = []
    for v in leaves:
        if isinstance(v, torch.Tensor):
            out.append(("tensor", tuple(v.shape), v.dtype, v.device))
        elif isinstance(v, int) and not isinstance(v, bool):
            out.append(("int",))
        else:
            out.append(("value", v))
    return spec, tuple(out)


class _Graph:
    __slots__ = ("guards", "replay", "inputs", "outputs", "out_spec", "calls")

    def __init__(self, guards, replay, inputs, outputs, out_spec, calls):
        self.guards, self.replay, self.inputs, self.outputs = guards, replay, inputs, outputs
        self.out_spec, self.calls = out_spec, calls

    def holds_for(self, integers: Sequence[int]) -> bool:
        return all(g.holds_for(v) for g, v in zip(self.guards, integers))


class GraphedStep:
    """``step(cores, leaves, spec) -> cores'`` through captured graphs of
    ``update(cores, tree_unflatten(leaves, spec))``, ``update`` pure; ``leaves`` are the stacked
    batches' leaves (tensors with the copies along dim 0, shared non-tensor values). ``counts``:
    the run's oracle counts (capture runs are not counted; each replay adds the capture's calls).

    ``graphs`` counts captures; ``reason`` is None while capturing, else why the run continues
    without capture (then ``step`` calls ``update`` directly)."""

    def __init__(self, update: Callable[[Any, Any], Any], backend: Backend, counts: Dict[str, int],
                 max_graphs: Optional[int] = None, warn: Optional[Callable[[str], None]] = None):
        self.update, self.backend, self.counts = update, backend, counts
        self.max_graphs = MAX_GRAPHS if max_graphs is None else max_graphs
        self.graphs, self.replays = 0, 0
        self.reason: Optional[str] = None
        self._kept: Dict[Any, List[_Graph]] = {}
        self._warn = warn or (lambda why: warnings.warn(why, GraphFallback, stacklevel=4))

    def __call__(self, cores: Any, leaves: List[Any], spec) -> Any:
        if self.reason is not None:
            return self.update(cores, tree_unflatten(leaves, spec))
        core_leaves, core_spec = tree_flatten(cores)
        key = (core_spec, _structure(core_leaves, None)[1], _structure(leaves, spec))
        integers = [v for v in leaves if isinstance(v, int) and not isinstance(v, bool)]
        tensors = [*core_leaves, *(v for v in leaves if isinstance(v, torch.Tensor))]
        graph = next((g for g in self._kept.get(key, ()) if g.holds_for(integers)), None)
        if graph is None:
            if self.graphs >= self.max_graphs:
                return self._stop(f"more than max_graphs={self.max_graphs} graphs would be needed (the step reads "
                                  f"an integer of the batches, such as the iteration t in a decaying step size, "
                                  f"in a way that differs at every iteration)", cores, leaves, spec)
            try:
                graph = self._capture(core_spec, len(core_leaves), leaves, spec, tensors)
            except Exception as error:  # not capturable (a host sync, ...): the rest of the run without capture
                return self._stop(f"the step could not be captured ({type(error).__name__}: "
                                  f"{str(error).splitlines()[0] if str(error) else ''})", cores, leaves, spec)
            self._kept.setdefault(key, []).append(graph)
            self.graphs += 1
        for static, value in zip(graph.inputs, tensors):
            static.copy_(value)
        graph.replay()
        self.replays += 1
        for kind, n in graph.calls.items():
            self.counts[kind] += n
        return tree_unflatten([o.clone() for o in graph.outputs], graph.out_spec)

    def _stop(self, why: str, cores, leaves, spec):
        self.reason = why
        self._warn(f"cuda_graph: {why}; the run continues without graph capture")
        return self.update(cores, tree_unflatten(leaves, spec))

    def _capture(self, core_spec, n_core: int, leaves: List[Any], spec, tensors: List[torch.Tensor]) -> _Graph:
        guarded = [Guarded(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in leaves]
        guards = [g for g in guarded if isinstance(g, Guarded)]
        tensor_at = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        inputs = [t.clone() for t in tensors]
        out_spec = []

        def fn(buffers: List[torch.Tensor]) -> List[torch.Tensor]:
            full = list(guarded)
            for i, t in zip(tensor_at, buffers[n_core:]):
                full[i] = t
            out, spec_out = tree_flatten(self.update(tree_unflatten(list(buffers[:n_core]), core_spec),
                                                     tree_unflatten(full, spec)))
            out_spec[:] = [spec_out]
            return out

        before = dict(self.counts)
        try:
            replay, outputs = self.backend.capture(fn, inputs)
            runs = getattr(self.backend, "warmup", 0) + 1
            calls = {k: (self.counts[k] - before.get(k, 0)) // runs for k in self.counts}
        finally:  # the warm-up and capture runs are not counted: each replay adds one step's calls
            self.counts.clear()
            self.counts.update(before)
        return _Graph(guards, replay, inputs, list(outputs), out_spec[0], calls)

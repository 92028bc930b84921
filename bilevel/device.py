"""Devices: where a problem's tensors, the run's generator and every step live.

    device = resolve_device(None)           # "cuda" when torch.cuda.is_available(), else "cpu"
    problem = to_device(problem, device)    # its tensors and modules, moved once (a copy)
    problem_device(problem)                 # where it lives now

A run happens on one device. :func:`bilevel.make_problem` builds a problem and moves it once
(``make_problem(name, device=...)``); :func:`bilevel.solve` seeds the run's generator
(:class:`~bilevel.sampling.RunGenerator`) on the problem's device, so every ``torch.randint`` /
``randperm`` of ``problem.sample`` draws there and the indices it returns index the problem's
tensors without a copy. The problems' losses and samplers then read nothing back to the host
except where a shape is chosen from data (the block order of a new epoch, :mod:`bilevel.sampling`;
the padded length of a token batch, :func:`problems.batches.trim_padding`); evaluation reads its
metrics. (Solver parts that still read a value about once a step: CG's report of the first
non-positive curvature, the term count of randomized Neumann and ``solve``'s NaN check.)

The same seed gives different draws on different devices (CUDA and CPU generators are different
algorithms); on one device a seed gives one run.

:func:`to_device` needs no per-problem code: it walks the problem's attributes (dicts, lists,
tuples, named tuples, dataclasses and plain objects, recursively) and moves every tensor and
``nn.Module`` it finds. It never modifies what it walks, which may be shared (a cached corpus):
an object holding something to move is shallow-copied, and a module is deep-copied before
``.to``. Objects with nothing to move are kept as they are.
"""
from __future__ import annotations

import copy
import re
import types
from typing import Any, Dict, Iterator, Optional, Union

import torch
from torch import Tensor, nn

DeviceLike = Union[None, str, torch.device]

_PATTERN = re.compile(r"^(cpu|cuda|cuda:\d+)$")


def default_device() -> torch.device:
    """``cuda`` (the current CUDA device) when one is available, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: DeviceLike = None, option: str = "device") -> torch.device:
    """The ``torch.device`` named by ``device``: None or "auto" for :func:`default_device`,
    "cpu", "cuda" or "cuda:N". ValueError naming ``option``, the value and the rule when the
    name is malformed or names a CUDA device this machine does not have."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return default_device()
    name = str(device) if isinstance(device, torch.device) else device
    if not isinstance(name, str) or not _PATTERN.match(name):
        raise ValueError(f"{option} must be 'cpu', 'cuda', 'cuda:N' or 'auto' (None), got {device!r}")
    resolved = torch.device(name)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option}={name!r}: CUDA is not available on this machine "
                             f"(torch.cuda.is_available() is False); use {option}='cpu'")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"{option}={name!r}: this machine has {count} CUDA device(s), "
                             f"cuda:0 .. cuda:{count - 1}")
    return resolved


def same_device(a: DeviceLike, b: DeviceLike) -> bool:
    """Whether two device names denote one device ("cuda" is the current CUDA device)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


# -- moving every tensor a problem holds -----------------------------------------------------------

_MODULE_SLOTS = ("_parameters", "_buffers", "_modules")  # moved by nn.Module.to
#: Never entered nor moved: plain values, and code (functions, methods, Python modules), whose
#: attributes reach far beyond the problem (a function's globals, a module's namespace).
_LEAVES = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, torch.Generator,
           types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType)


def _module_device(module: nn.Module) -> Optional[torch.device]:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return None


def _move(obj: Any, device: torch.device, memo: Dict[int, Any]) -> Any:
    """``obj`` with every tensor and module moved to ``device``; ``obj`` itself when nothing in
    it moves. Shared sub-objects are moved once (``memo``, also ending cycles)."""
    key = id(obj)
    if key in memo:
        return memo[key]
    memo[key] = obj  # a cycle back to obj sees obj itself
    out = _move_new(obj, device, memo)
    memo[key] = out
    return out


def _move_new(obj: Any, device: torch.device, memo: Dict[int, Any]) -> Any:
    if isinstance(obj, _LEAVES) or isinstance(obj, type):
        return obj
    if isinstance(obj, Tensor):
        return obj if same_device(obj.device, device) else obj.to(device)
    if isinstance(obj, nn.Module):
        return _move_module(obj, device, memo)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple
        values = [_move(v, device, memo) for v in obj]
        return obj if all(a is b for a, b in zip(values, obj)) else type(obj)(*values)
    if isinstance(obj, (list, tuple)):
        values = [_move(v, device, memo) for v in obj]
        if all(a is b for a, b in zip(values, obj)):
            return obj
        return type(obj)(values) if type(obj) in (list, tuple) else _copy_sequence(obj, values)
    if isinstance(obj, dict):
        values = {k: _move(v, device, memo) for k, v in obj.items()}
        if all(values[k] is v for k, v in obj.items()):
            return obj
        new = copy.copy(obj)
        new.update(values)
        return new
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return _move_attributes(obj, device, memo)
    return obj


def _extras(module: nn.Module):
    """(submodule, name, value) of the plain attributes of every submodule (parameters,
    buffers and submodules excluded: ``nn.Module.to`` moves those), e.g. a tensor kept aside."""
    return [(sub, name, value) for sub in module.modules() for name, value in list(vars(sub).items())
            if name not in _MODULE_SLOTS]


def _move_module(module: nn.Module, device: torch.device, memo: Dict[int, Any]) -> nn.Module:
    """``module`` when its parameters, buffers and plain tensor attributes are all on ``device``;
    else a deep copy moved there (the original may be shared: it is left as it is)."""
    held = _module_device(module)
    stale = held is not None and not same_device(held, device)
    if not stale:
        stale = any(_move(value, device, {}) is not value for _, _, value in _extras(module))
    if not stale:
        return module
    fresh = copy.deepcopy(module).to(device)
    for sub, name, value in _extras(fresh):
        new = _move(value, device, memo)
        if new is not value:
            object.__setattr__(sub, name, new)
    return fresh


def _copy_sequence(obj, values):
    new = copy.copy(obj)
    new[:] = values
    return new


def _move_attributes(obj: Any, device: torch.device, memo: Dict[int, Any]) -> Any:
    """A shallow copy of ``obj`` with its attributes moved (``obj`` when none moves). Attributes
    are set with ``object.__setattr__``, so frozen dataclasses work too. The copy is made first,
    so that a cycle back to ``obj`` (``self.me = self``) reaches the copy."""
    new_obj = copy.copy(obj)
    memo[id(obj)] = new_obj
    moved = {}
    for name, value in vars(obj).items():
        new = _move(value, device, memo)
        if new is not value and value is not obj:  # a direct self-reference alone moves nothing
            moved[name] = new
    if not moved:
        memo[id(obj)] = obj
        return obj
    for name, value in vars(obj).items():
        if value is obj:
            moved[name] = new_obj
    for name, value in moved.items():
        object.__setattr__(new_obj, name, value)
    return new_obj


def to_device(obj: Any, device: DeviceLike) -> Any:
    """``obj`` (a problem, a tree, any container) with every tensor and ``nn.Module`` it holds on
    ``device``; ``obj`` itself when everything already is there. Never modifies ``obj``."""
    target = resolve_device(device)
    if not _stale(obj, target):
        return obj
    return _move(obj, target, {})


def _stale(obj: Any, device: torch.device) -> bool:
    """Whether anything reachable from ``obj`` (tensors; module parameters, buffers and plain
    tensor attributes) is on another device than ``device``."""
    for o in reachable(obj):
        if isinstance(o, Tensor) and not same_device(o.device, device):
            return True
        if isinstance(o, nn.Module):
            tensors = [*o.parameters(), *o.buffers(), *(v for _, _, v in _extras(o) if isinstance(v, Tensor))]
            if any(not same_device(t.device, device) for t in tensors):
                return True
    return False


def reachable(obj: Any) -> Iterator[Any]:
    """Every object reachable from ``obj`` through containers and attributes, as :func:`to_device`
    walks them (each once; modules are not entered: their tensors are their own)."""
    seen, stack = set(), [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, _LEAVES) or isinstance(o, type):
            continue
        seen.add(id(o))
        yield o
        if isinstance(o, (Tensor, nn.Module)):
            continue
        items = (list(o.values()) if isinstance(o, dict) else list(o) if isinstance(o, (list, tuple))
                 else list(vars(o).values()) if hasattr(o, "__dict__") else [])
        stack.extend(reversed(items))


def find_device(obj: Any) -> Optional[torch.device]:
    """The device of the first tensor or module parameter found in ``obj`` (walked as
    :func:`to_device` does), or None when it holds none."""
    for o in reachable(obj):
        found = o.device if isinstance(o, Tensor) else _module_device(o) if isinstance(o, nn.Module) else None
        if found is not None:
            return found
    return None


def holds_module(obj: Any, kinds) -> bool:
    """Whether ``obj`` holds an ``nn.Module`` with a submodule of type ``kinds`` (e.g. ``nn.RNNBase``)."""
    return any(isinstance(o, nn.Module) and any(isinstance(m, kinds) for m in o.modules()) for o in reachable(obj))


def problem_device(problem: Any) -> torch.device:
    """Where ``problem`` lives: the device of the first tensor it holds (cpu when it holds none,
    e.g. a problem that makes every tensor in its losses)."""
    return find_device(problem) or torch.device("cpu")


def tree_device(tree: Dict[str, Tensor]) -> Optional[torch.device]:
    """The device of a tree's first leaf (None for an empty tree)."""
    for value in tree.values():
        return value.device
    return None


__all__ = ["default_device", "resolve_device", "same_device", "to_device", "reachable", "find_device",
           "holds_module", "problem_device", "tree_device"]

"""Name registries for solvers and problems.

``@register_solver("soba", paper=...)`` and ``@register_problem("quadratic")`` add a class under
a name; :func:`make_solver` / :func:`make_problem` build one from keyword options, failing with
the list of valid names or options when one is wrong. The registries fill themselves on first
use by importing :mod:`bilevel.solvers` and :mod:`bilevel.problems`.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
from typing import Any, Callable, Dict, List, NamedTuple, Optional


class Entry(NamedTuple):
    name: str
    cls: type
    description: str
    paper: str


class Registry:
    """A mapping from names to classes, with option validation."""

    def __init__(self, kind: str, package: str):
        self.kind, self._package = kind, package
        self._entries: Dict[str, Entry] = {}
        self._loaded = False

    def register(self, name: str, *, paper: str = "", description: Optional[str] = None) -> Callable[[type], type]:
        def decorator(cls: type) -> type:
            if name in self._entries and self._entries[name].cls is not cls:
                raise ValueError(f"{self.kind} name {name!r} is already registered to {self._entries[name].cls.__name__}")
            doc = description or (inspect.getdoc(cls) or "").split("\n", 1)[0]
            self._entries[name] = Entry(name, cls, doc, paper)
            cls.registry_name = name
            return cls
        return decorator

    def unregister(self, name: str) -> None:
        """Forget ``name`` (a no-op when it is not registered), e.g. a user class registered by
        ``problem=MODULE:CLASS`` whose module is gone."""
        self._entries.pop(name, None)

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self._package)

    def names(self) -> List[str]:
        self._load()
        return sorted(self._entries)

    def entries(self) -> List[Entry]:
        self._load()
        return [self._entries[n] for n in sorted(self._entries)]

    def get(self, name: str) -> Entry:
        self._load()
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), list(self._entries), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}{hint}; valid: {', '.join(self.names())}")
        return self._entries[name]

    def options(self, name: str) -> Dict[str, Any]:
        """Option names of ``name`` and their defaults."""
        return options_of(self.get(name).cls)

    def create(self, name: str, **options) -> Any:
        cls = self.get(name).cls
        check_options(cls, options, f"{self.kind} {name!r}")
        return cls(**options)


def options_of(cls: type) -> Dict[str, Any]:
    """Keyword options a class accepts: dataclass fields, else ``__init__`` parameters."""
    if dataclasses.is_dataclass(cls):
        out = {}
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
            else:
                out[f.name] = inspect.Parameter.empty
        return out
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_options(cls: type, options: Dict[str, Any], label: str) -> None:
    valid = options_of(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        hints = [f"{u!r} (did you mean {difflib.get_close_matches(u, list(valid), n=1)[0]!r}?)"
                 if difflib.get_close_matches(u, list(valid), n=1) else repr(u) for u in unknown]
        raise TypeError(f"{label} got unknown option(s) {', '.join(hints)}; valid: {', '.join(sorted(valid))}")


SOLVERS = Registry("solver", "bilevel.solvers")
PROBLEMS = Registry("problem", "bilevel.problems")

register_solver = SOLVERS.register
register_problem = PROBLEMS.register


def make_solver(name: str, **options):
    return SOLVERS.create(name, **options)


def presets_of(cls: type) -> Dict[str, Dict[str, Any]]:
    """Named option sets of a problem class (its ``PRESETS`` attribute, e.g. "tiny", "paper")."""
    return dict(getattr(cls, "PRESETS", {}) or {})


def preset_options(name: str, preset: Optional[str], options: Dict[str, Any]) -> Dict[str, Any]:
    """The options of problem ``name``: its preset ``preset`` (if any) updated with ``options``.

    Raises KeyError naming the problem and its presets when ``preset`` is unknown.
    """
    if preset is None:
        return dict(options)
    presets = presets_of(PROBLEMS.get(name).cls)
    if preset not in presets:
        raise KeyError(f"problem {name!r} has no preset {preset!r}; its presets: "
                       f"{', '.join(sorted(presets)) or 'none'}")
    return {**presets[preset], **options}


def make_problem(name: str, preset: Optional[str] = None, *, device=None, **options):
    """Build problem ``name`` from its ``preset`` (optional) and explicit ``options``, on
    ``device`` ("cpu", "cuda", "cuda:N"; None or "auto": cuda when available, else cpu).

    The problem is built, then every tensor and module it holds is moved to the device once
    (:meth:`~bilevel.problem.BilevelProblem.to`); a problem class that takes a ``device``
    option itself gets it too. ValueError naming the device when it is malformed or absent.
    """
    from .device import resolve_device, to_device
    target = resolve_device(device)
    options = preset_options(name, preset, options)
    if "device" in options_of(PROBLEMS.get(name).cls):
        options.setdefault("device", str(target))
    return to_device(PROBLEMS.create(name, **options), target)

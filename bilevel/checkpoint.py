"""Checkpoints: a solver state as tensors and plain data, written atomically, loaded safely.

    save_checkpoint(path, state, solver=..., problem=...)      # during or after a run
    checkpoint = load_checkpoint(path)                         # torch.load(weights_only=True)
    solve(problem, solver, steps, state=checkpoint)            # refuses a mismatch, naming it

A :class:`~bilevel.solver.State` (the run record) holds the solver's typed state (NamedTuples
such as ``SingleLoopState``, ``Memory``, ... whose leaves are tensors), numbers and a
``torch.Generator``. Pickling it as is needs
``weights_only=False``, which executes whatever a file asks for. Instead the state is *encoded*
into nested dicts, lists, tensors and numbers (the only things the ``weights_only`` unpickler
accepts): a NamedTuple or dataclass becomes ``{"__class__": "module:QualName", "fields": {...}}``
and a generator ``{"__generator__": its get_state() tensor, "device": ...}``. Decoding rebuilds
classes only from an allow-list: NamedTuples and dataclasses defined in the ``bilevel``
package (solvers included). This was preferred to ``torch.serialization.add_safe_globals``,
which needs every state class registered in advance (and again for each new solver), mutates a
process-wide list, and still pickles ``torch.Generator`` objects, which weights-only loading
rejects.

Each checkpoint records the solver's registry name and hyperparameters, the problem's name,
class and options (when known), the library version and, for run folders, the evaluation
records so far. :func:`check_compatible` compares them with the solver and problem a run is
given and raises :class:`CheckpointMismatch` naming the first difference.

Every file is written to a temporary name in the same folder and renamed (:func:`atomic_write`),
so an interruption or a full disk never leaves a truncated file under the final name.
"""
from __future__ import annotations

import dataclasses
import importlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from . import schedules
from .sampling import Epoch, restore_generator

FORMAT = "bilevel-checkpoint"
#: 2: the run record State(core=<typed tensor state>, iteration, generator, ...) of the typed
#: solver states; version-1 checkpoints (untyped State slots) are refused with that message.
FORMAT_VERSION = 2
#: Modules whose NamedTuples and dataclasses a checkpoint may rebuild.
ALLOWED_PACKAGE = "bilevel"


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read (the message names the file and the cause)."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint was written by another solver, problem, options or library version."""


# ---------------------------------------------------------------------------------------------
# atomic writes


def atomic_write(path: Union[str, Path], data: Union[bytes, str]) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so
    readers see either the old file or the complete new one. On failure (full disk, interrupt)
    the temporary file is removed and the error re-raised. In a data-parallel run
    (:mod:`bilevel.distributed`) only rank 0 writes; the other ranks return at once."""
    from . import distributed
    if not distributed.is_main():
        return
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with _suppress():
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, f"cannot write {path} ({exc.strerror or exc}); nothing was left under "
                                     "that name") from exc
        raise


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


# ---------------------------------------------------------------------------------------------
# plain-data encoding


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def encode(value: Any, where: str = "state") -> Any:
    """``value`` as nested dicts/lists/tensors/numbers; TypeError naming the field otherwise."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Generator):  # with the epoch positions of a RunGenerator
        streams = getattr(value, "streams", {})
        return {"__generator__": value.get_state(), "device": str(value.device),
                "streams": [[list(key), list(epoch.order), epoch.position] for key, epoch in streams.items()]}
    if _is_namedtuple(value) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        cls = type(value)
        _allowed(cls, where)
        names = cls._fields if _is_namedtuple(value) else [f.name for f in dataclasses.fields(value)]
        return {"__class__": _class_path(cls),
                "fields": {n: encode(getattr(value, n), f"{where}.{n}") for n in names}}
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint: {where} has a key of type {type(key).__name__}; keys must be str or int")
        if any(isinstance(k, str) and k.startswith("__") for k in value):
            return {"__dict__": [[k, encode(v, f"{where}[{k!r}]")] for k, v in value.items()]}
        return {k: encode(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list):
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    raise TypeError(f"checkpoint: {where} holds a {type(value).__module__}.{type(value).__qualname__}; a state "
                    "may hold only tensors, numbers, strings, None, dicts, lists, tuples, the bilevel package's "
                    "NamedTuples and dataclasses, and torch.Generator")


def _allowed(cls: type, where: str) -> None:
    module = cls.__module__
    if module != ALLOWED_PACKAGE and not module.startswith(ALLOWED_PACKAGE + "."):
        raise TypeError(f"checkpoint: {where} is a {_class_path(cls)}; only NamedTuples and dataclasses of the "
                        f"{ALLOWED_PACKAGE} package can be stored (use dicts or tuples for your own state)")


def _resolve(path: str, where: str) -> type:
    module, _, qualname = path.partition(":")
    if module != ALLOWED_PACKAGE and not module.startswith(ALLOWED_PACKAGE + "."):
        raise CheckpointError(f"{where}: class {path!r} is outside the {ALLOWED_PACKAGE} package; refusing to build it")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(f"{where}: class {path!r} no longer exists ({exc}); the checkpoint was written by "
                              "another version of bilevel") from None
    if not (isinstance(obj, type) and (issubclass(obj, tuple) and hasattr(obj, "_fields")
                                       or dataclasses.is_dataclass(obj))):
        raise CheckpointError(f"{where}: {path!r} is not a NamedTuple or dataclass; refusing to build it")
    return obj


def decode(value: Any, where: str = "state") -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(value, list):
        return [decode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    if "__generator__" in value:
        streams = {tuple(key): Epoch(tuple(order), int(position))
                   for key, order, position in value.get("streams", [])}
        return restore_generator(value["device"], value["__generator__"], streams)
    if "__tuple__" in value:
        return tuple(decode(v, f"{where}[{i}]") for i, v in enumerate(value["__tuple__"]))
    if "__dict__" in value:
        return {k: decode(v, f"{where}[{k!r}]") for k, v in value["__dict__"]}
    if "__class__" in value:
        cls = _resolve(value["__class__"], where)
        fields = {k: decode(v, f"{where}.{k}") for k, v in value["fields"].items()}
        try:
            return cls(**fields)
        except TypeError as exc:
            raise CheckpointError(f"{where}: cannot rebuild {value['__class__']} ({exc}); the checkpoint was "
                                  "written by another version of bilevel") from None
    return {k: decode(v, f"{where}[{k!r}]") for k, v in value.items()}


# ---------------------------------------------------------------------------------------------
# checkpoint files


def plain(value: Any) -> Any:
    """Hyperparameters or options as comparable plain data (other objects, e.g. a step-size
    schedule, by their repr without memory addresses, so that two processes agree)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "to_config"):  # a step-size schedule, in the config syntax {value, decay}
        return value.to_config()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))  # a function's repr without its address


def solver_name(solver) -> str:
    return getattr(type(solver), "registry_name", type(solver).__name__)


def problem_description(problem) -> Dict[str, Any]:
    """Name, class and (when the problem was built by :func:`bilevel.make_problem`) options."""
    options = getattr(problem, "problem_options", None)
    return {"name": getattr(problem, "name", type(problem).__name__), "class": _class_path(type(problem)),
            "options": plain(options) if options is not None else None}


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint: the state and what produced it."""
    state: Any
    solver: str
    hyperparameters: Dict[str, Any]
    problem: Dict[str, Any]
    library_version: str
    kind: str = "checkpoint"
    history: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    path: Optional[Path] = None

    @property
    def iteration(self) -> int:
        return self.state.iteration


def save_checkpoint(path: Union[str, Path], state, *, solver, problem, kind: str = "checkpoint",
                    history: Optional[List[Dict[str, Any]]] = None) -> Path:
    """Write ``state`` with its provenance to ``path`` atomically. ``kind`` says what the state
    is: ``"checkpoint"`` (periodic), ``"interrupted"``, ``"last-good"`` (before a NaN) or
    ``"final"``. In a data-parallel run only rank 0 writes (the others return at once)."""
    from . import __version__, distributed
    if not distributed.is_main():
        return Path(path)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
               "kind": kind, "solver": solver_name(solver), "hyperparameters": plain(solver.hyperparameters()),
               "problem": problem_description(problem), "history": plain(history or []),
               "state": encode(state)}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(path, buffer.getvalue())
    return Path(path)


def load_checkpoint(path: Union[str, Path], *, solver=None, problem=None) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (``torch.load(weights_only=True)``:
    no code in the file is run). When ``solver`` or ``problem`` is given, also check that the
    checkpoint belongs to them (:func:`check_compatible`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        payload = torch.load(path, weights_only=True)  # tensors return to the device they were saved from
    except Exception as exc:  # truncated file, not a torch file, forbidden content
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); it is damaged or not a "
                              "bilevel checkpoint") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bilevel checkpoint (written by save_checkpoint)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatch(f"checkpoint {path} has format version {payload.get('format_version')}; this "
                                 f"bilevel reads version {FORMAT_VERSION}")
    checkpoint = Checkpoint(state=decode(payload["state"], f"{path.name}: state"), solver=payload["solver"],
                            hyperparameters=_solver_options(payload["hyperparameters"]), problem=payload["problem"],
                            library_version=payload["library_version"], kind=payload["kind"],
                            history=payload["history"], path=path)
    if solver is not None or problem is not None:
        check_compatible(checkpoint, solver=solver, problem=problem)
    return checkpoint


def _solver_options(hyperparameters: Dict[str, Any]) -> Dict[str, Any]:
    """The recorded hyperparameters as solver arguments: step-size schedules, stored in the config
    syntax ``{value, decay}``, become :class:`~bilevel.schedules.PolyDecay` again."""
    return {key: schedules.parse(value, key) if isinstance(value, dict) and key.endswith(schedules.STEP_SIZE_SUFFIX)
            else value for key, value in hyperparameters.items()}


def check_compatible(checkpoint: Checkpoint, *, solver=None, problem=None) -> None:
    """Raise :class:`CheckpointMismatch` naming the first difference between what wrote the
    checkpoint and ``solver`` / ``problem`` / this library version."""
    from . import __version__
    where = f"checkpoint {checkpoint.path}" if checkpoint.path else "checkpoint"
    if checkpoint.library_version != __version__:
        raise CheckpointMismatch(f"{where} was written by bilevel {checkpoint.library_version}; this is "
                                 f"bilevel {__version__}")
    if solver is not None:
        name = solver_name(solver)
        if name != checkpoint.solver:
            raise CheckpointMismatch(f"{where} is a {checkpoint.solver!r} state; it cannot continue solver {name!r}")
        given, saved = plain(solver.hyperparameters()), plain(checkpoint.hyperparameters)
        for key in sorted(set(given) | set(saved)):
            if given.get(key) != saved.get(key):
                raise CheckpointMismatch(f"{where}: solver {name!r} option {key} was "
                                         f"{saved.get(key)!r} when it was written, "
                                         f"{given.get(key)!r} now")
    if problem is not None:
        given = problem_description(problem)
        saved = checkpoint.problem
        for key in ("name", "class"):
            if given[key] != saved.get(key):
                raise CheckpointMismatch(f"{where} was written on problem {saved.get(key)!r} ({key}); this run's "
                                         f"problem is {given[key]!r}")
        if given["options"] is not None and saved.get("options") is not None:
            mine, theirs = given["options"], saved["options"]
            for key in sorted(set(mine) | set(theirs)):
                if mine.get(key) != theirs.get(key):
                    raise CheckpointMismatch(f"{where}: problem option {key} was {theirs.get(key)!r} when it was "
                                             f"written, {mine.get(key)!r} now")

"""Step sizes: a number, or a schedule of the outer iteration t = 0, 1, 2, ...

Every step-size field of every solver (the fields named ``*_lr``: ``upper_lr``, ``lower_lr``,
``z_lr``, ``neumann_lr``) takes

* a positive number c: the constant step c (or c / (t + 1)^e when the solver has a
  ``<field>_decay`` exponent e, e.g. TTSA's ``lower_lr_decay``);
* a :class:`PolyDecay` ``PolyDecay(value=c, exponent=e)``: the step c / (t + 1)^e, the schedule
  of the benchopt bilevel benchmark (its ``learning_rate_scheduler.update_lr``: the k-th update,
  k = 0, 1, ..., uses ``constant / (k + 1) ** exponent``). A schedule is used as given: the
  solver's ``<field>_decay`` exponent does not apply to it;
* a :class:`Cosine` ``Cosine(value, total, warmup, final)``: linear warm-up then cosine decay
  (BLISS's schedule on both levels);
* any callable t -> lr_t (accepted as is; not picklable when it is a lambda, so prefer
  :class:`PolyDecay` when runs are checkpointed).

:func:`at` resolves a step size at iteration t; :func:`decayed` turns a number and a decay
exponent into a schedule. From a configuration (YAML or ``key=value``) a step size is a number
or a mapping ``{value: c, decay: e}`` (or ``{value, total, warmup, final}`` for a cosine); :func:`parse` turns that into a number or a
:class:`PolyDecay` and rejects anything else with an error naming the field.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

#: Solver dataclass fields whose name ends with this suffix are step sizes.
STEP_SIZE_SUFFIX = "_lr"
#: Keys of a step size written as a mapping in a configuration.
MAPPING_KEYS = ("value", "decay")
#: Keys of a cosine schedule written as a mapping ({value, total, warmup, final}: :class:`Cosine`).
COSINE_KEYS = ("value", "total", "warmup", "final")
SYNTAX = "a positive number, or a mapping {value: c, decay: e} meaning c / (t + 1)^e"
#: Strings passed through to the solver, which resolves them itself (``neumann_lr="auto"``).
KEYWORDS = ("auto",)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class PolyDecay:
    """lr_t = value / (t + 1)^exponent at outer iteration t = 0, 1, ...; exponent 0: constant.

    A frozen dataclass (not a closure) so that solvers holding it pickle with ``torch.save``.
    """
    value: float
    exponent: float = 0.0

    def __post_init__(self):
        if not _is_number(self.value) or not 0 < self.value < math.inf:
            raise ValueError(f"PolyDecay value must be a positive number, got {self.value!r}")
        if not _is_number(self.exponent) or not (math.isfinite(self.exponent) and self.exponent >= 0):
            raise ValueError(f"PolyDecay exponent must be a finite number >= 0, got {self.exponent!r}")

    def __call__(self, t: int) -> float:
        return self.value / (t + 1) ** self.exponent

    def to_config(self) -> dict:
        """The configuration syntax {value: c, decay: e} (what :func:`parse` reads back)."""
        return {"value": self.value, "decay": self.exponent}


@dataclass(frozen=True)
class Cosine:
    """Linear warm-up then cosine decay over ``total`` outer iterations t = 0, 1, ...:

        lr_t = value (t + 1) / warmup                                   t < warmup
        lr_t = final + (value - final) (1 + cos(pi p_t)) / 2            otherwise,
               p_t = min(1, (t - warmup) / max(1, total - warmup))

    Hugging Face's ``get_cosine_schedule_with_warmup`` (used by BLISS on both levels, with
    warmup = 10 % of the steps) is the case final = 0, except that its first step has lr 0 (its
    ramp is t / warmup); here the ramp starts at value / warmup so no step is wasted. After
    ``total`` the step stays at ``final``.
    """
    value: float
    total: int
    warmup: int = 0
    final: float = 0.0

    def __post_init__(self):
        if not _is_number(self.value) or not 0 < self.value < math.inf:
            raise ValueError(f"Cosine value must be a positive number, got {self.value!r}")
        if not isinstance(self.total, int) or isinstance(self.total, bool) or self.total < 1:
            raise ValueError(f"Cosine total must be an integer >= 1, got {self.total!r}")
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or not 0 <= self.warmup <= self.total:
            raise ValueError(f"Cosine warmup must be an integer in [0, total={self.total}], got {self.warmup!r}")
        if not _is_number(self.final) or not 0 <= self.final <= self.value:
            raise ValueError(f"Cosine final must be a number in [0, value={self.value}], got {self.final!r}")

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return self.value * (t + 1) / self.warmup
        progress = min(1.0, (t - self.warmup) / max(1, self.total - self.warmup))
        return self.final + (self.value - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def to_config(self) -> dict:
        return {"value": self.value, "total": self.total, "warmup": self.warmup, "final": self.final}


def cosine(value: float, total: int, warmup_fraction: float = 0.1, final: float = 0.0) -> Cosine:
    """:class:`Cosine` with ``warmup = round(warmup_fraction * total)`` (BLISS: 10 %)."""
    if not _is_number(warmup_fraction) or not 0 <= warmup_fraction <= 1:
        raise ValueError(f"warmup_fraction must be in [0, 1], got {warmup_fraction!r}")
    return Cosine(float(value), int(total), int(round(warmup_fraction * total)), float(final))


#: The annotation of step-size fields: a float, a :class:`PolyDecay` or a callable t -> lr_t.
#: Spelled ``Any`` because OmegaConf (solver dataclasses are its structured configs) rejects a
#: Union with callables; configs go through :func:`parse`.
StepSize = Any


def is_schedule(step: Any) -> bool:
    """True for a :class:`PolyDecay` or another callable t -> lr_t."""
    return callable(step)


def at(step: StepSize, t: int) -> Any:
    """The step size at outer iteration ``t``: ``step(t)`` for a schedule, else ``step`` itself
    (a number, or a non-numeric marker such as ``"auto"`` that its owner resolves)."""
    return step(t) if callable(step) else step


def decayed(step: StepSize, exponent: float) -> StepSize:
    """A number c with a decay exponent e becomes ``PolyDecay(c, e)`` (c itself when e == 0, so
    the constant case is bit for bit the plain number); a schedule is returned unchanged."""
    if callable(step) or not exponent:
        return step
    return PolyDecay(step, exponent)


def step_size_fields(cls_or_solver: Any):
    """Names of the step-size fields (``*_lr``) of a solver dataclass or instance."""
    return [f.name for f in dataclasses.fields(cls_or_solver) if f.name.endswith(STEP_SIZE_SUFFIX)]


def resolved(solver: Any, t: int) -> Any:
    """A shallow copy of ``solver`` with every step-size field resolved at iteration ``t`` (a
    float; non-numeric markers such as ``"auto"`` are kept). Used to build estimators that take
    a float step, e.g. ``Neumann(lr=...)``, at the current iteration. No validation is re-run."""
    out = copy.copy(solver)
    for name in step_size_fields(solver):
        object.__setattr__(out, name, at(getattr(solver, name), t))
    return out


def parse(value: Any, field: str) -> Any:
    """A step size from a configuration: a number is returned as a float; a mapping
    ``{value: c, decay: e}`` (``decay`` optional, default 0) becomes ``PolyDecay(c, e)``; a keyword
    of :data:`KEYWORDS` is passed through for the solver to check; anything else (a string, a
    list, a mapping with other keys) raises ``ValueError`` naming ``field``."""
    if _is_number(value):
        return float(value)
    if isinstance(value, (PolyDecay, Cosine)) or (isinstance(value, str) and value in KEYWORDS):
        return value
    if isinstance(value, Mapping) and "total" in value:
        unknown = sorted(set(map(str, value)) - set(COSINE_KEYS))
        if unknown or "value" not in value:
            problem = f"unknown key(s) {unknown}" if unknown else "the key 'value' is missing"
            raise ValueError(f"{field}: {problem}; a cosine step size is a mapping with keys {COSINE_KEYS}, "
                             f"got {dict(value)!r}")
        try:
            return Cosine(float(value["value"]), value["total"], value.get("warmup", 0),
                          float(value.get("final", 0.0)))
        except ValueError as exc:
            raise ValueError(f"{field}: {exc}") from None
    if isinstance(value, Mapping):
        unknown = sorted(set(map(str, value)) - set(MAPPING_KEYS))
        if unknown or "value" not in value:
            problem = f"unknown key(s) {unknown}" if unknown else "the key 'value' is missing"
            raise ValueError(f"{field}: {problem}; a step size is {SYNTAX}, got {dict(value)!r}")
        try:
            return PolyDecay(value["value"], value.get("decay", 0.0))
        except ValueError as exc:
            raise ValueError(f"{field}: {exc}") from None
    raise ValueError(f"{field}: a step size is {SYNTAX}, got {value!r}")

"""Checks of solver hyperparameters, called from each solver's ``__post_init__``.

Each check reads attributes of the solver by name and raises ``ValueError`` naming the field,
the rule and the value, so that ``solve(problem, "bo-rep", beta=1.5)`` fails before any work.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

from . import schedules


def check_positive(solver: Any, *names: str) -> None:
    """Step sizes and scales: positive numbers. A step-size field (named ``*_lr``, see
    :mod:`bilevel.schedules`) may also be a schedule: a :class:`~bilevel.schedules.PolyDecay`
    (validated when built) or a callable t -> lr_t; any other field must be a number."""
    for name in names:
        value = getattr(solver, name)
        if callable(value) and name.endswith(schedules.STEP_SIZE_SUFFIX):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            if name.endswith(schedules.STEP_SIZE_SUFFIX):
                raise ValueError(f"{name} must be a positive number or a schedule "
                                 f"(bilevel.schedules.PolyDecay(value, exponent)), got {value!r}")
            raise ValueError(f"{name} must be a positive number, got {value!r}")


def check_count(solver: Any, *names: str, minimum: int = 1) -> None:
    """Step counts and periods: integers >= minimum."""
    for name in names:
        value = getattr(solver, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_unit(solver: Any, *names: str) -> None:
    """Momentum and averaging weights: numbers in [0, 1)."""
    for name in names:
        value = getattr(solver, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {value!r}")


def check_exponent(solver: Any, *names: str) -> None:
    """Decay exponents e of lr_t = c / (t + 1)^e: finite and >= 0 (0: a constant step)."""
    for name in names:
        value = getattr(solver, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_tolerance(solver: Any, *names: str) -> None:
    """Stopping tolerances: finite numbers >= 0 (0: run every step)."""
    for name in names:
        value = getattr(solver, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0 (a stopping tolerance; 0 runs every step), "
                             f"got {value!r}")


def check_radius(solver: Any, *names: str) -> None:
    """Projection radii: None (no projection) or a positive finite number."""
    for name in names:
        value = getattr(solver, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{name} must be None (no projection) or a positive number, got {value!r}")


def check_choice(solver: Any, name: str, choices: Iterable[str]) -> None:
    """Named variants: one of ``choices``."""
    value, choices = getattr(solver, name), tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_positive_or_auto(solver: Any, *names: str) -> None:
    """Step sizes that may also be "auto" (1/L of the lower Hessian, estimated at init by
    :mod:`bilevel.spectrum`); any other string is rejected."""
    for name in names:
        value = getattr(solver, name)
        if isinstance(value, str):
            if value != "auto":
                raise ValueError(f"{name} must be a positive number or 'auto' (1/L of the lower Hessian, "
                                 f"estimated at init), got {value!r}")
            continue
        check_positive(solver, name)

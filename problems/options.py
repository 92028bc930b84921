"""Checks of problem options, shared by every problem constructor.

Each check raises ``ValueError("<problem>: option <option> must be <rule>, got <value>")``, naming
the problem, the option, the rule it breaks and the value received, and returns the value in its
canonical type (``int`` / ``float`` / ``torch.dtype``) so that constructors can store it directly.
Integers are ``numbers.Integral`` (numpy integers included) but not ``bool``; reals are finite
``numbers.Real`` that are not ``bool``.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch

#: The ``dtype`` option of every problem: its accepted names and the torch dtypes they select.
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Lower precisions that problems with neural networks also accept as ``dtype``: the variables
#: and the data stay float32 and the networks run under ``torch.autocast`` in that precision.
AUTOCAST = {"bfloat16": torch.bfloat16}


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def option_error(problem: str, option: str, rule: str, value) -> ValueError:
    return ValueError(f"{problem}: option {option} must be {rule}, got {value!r}")


def check_int(problem: str, option: str, value, minimum: Optional[int] = 1, allow_none: bool = False,
              rule: Optional[str] = None) -> Optional[int]:
    """An int >= ``minimum`` (any int when minimum is None), or None when ``allow_none``."""
    if value is None and allow_none:
        return None
    if not is_int(value) or (minimum is not None and value < minimum):
        if rule is None:
            rule = "an int" + ("" if minimum is None else f" >= {minimum}") + (" or None" if allow_none else "")
        raise option_error(problem, option, rule, value)
    return int(value)


def check_real(problem: str, option: str, value, low: float = -math.inf, high: float = math.inf,
               include_low: bool = False, allow_none: bool = False, rule: Optional[str] = None) -> Optional[float]:
    """A finite number in (low, high), or in [low, high) with ``include_low``; None when ``allow_none``."""
    if value is None and allow_none:
        return None
    above = is_real(value) and (value >= low if include_low else value > low)
    if not (above and value < high):
        if rule is None:
            rule = f"a finite number in {'[' if include_low else '('}{low}, {high})"
        raise option_error(problem, option, rule, value)
    return float(value)


def check_choice(problem: str, option: str, value, choices: Sequence):
    """One of ``choices``."""
    if value not in choices:
        raise option_error(problem, option, f"one of {list(choices)}", value)
    return value


def check_dtype(problem: str, dtype) -> torch.dtype:
    """The torch dtype named by the ``dtype`` option ("float32" or "float64")."""
    return DTYPES[check_choice(problem, "dtype", dtype, sorted(DTYPES))]


def check_precision(problem: str, dtype) -> Tuple[torch.dtype, Optional[torch.dtype]]:
    """(dtype of variables and data, autocast dtype or None) named by the ``dtype`` option of a
    problem with neural networks: "float32", "float64", or "bfloat16" = float32 variables with
    the networks under bf16 autocast (mixed precision: products in bf16, sums and the losses in
    float32, gradients and oracles in float32)."""
    check_choice(problem, "dtype", dtype, sorted(DTYPES) + sorted(AUTOCAST))
    if dtype in AUTOCAST:
        return torch.float32, AUTOCAST[dtype]
    return DTYPES[dtype], None

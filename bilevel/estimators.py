"""Hypergradient estimators: one object per method, for solvers and :func:`bilevel.hypergradient`.

    grad Phi(x) ~ grad_x f(x, y) - d2_xy g(x, y) . v,        d2_yy g(x, y) . v ~ grad_y f(x, y)

Every method of :mod:`bilevel.hypergrad` is one frozen dataclass here (``METHODS``: exact, cg,
neumann, linear_sgd, fixed_point, itd). Its fields are its options, checked once, when it is
built (a bad value is a ValueError naming the field and the rule). Every estimator speaks one
protocol:

    init(x, y) -> state                                   warm start (None, or a tree of tensors)
    draw(problem, generator, share_lower_batch) -> Draw   every random choice, drawn up front
    __call__(problem, x, y, state, draw) -> (h, state)    the estimate on that draw

Randomness enters only through a :class:`Draw`: the batches and the randomized Neumann term are
drawn from the run's generator in the algorithm's order and nothing more, so a solver can
evaluate one draw at two points (STORM, SPIDER) and see exactly the same samples.
:meth:`Estimator.given` builds the draw of given batches instead (what
:func:`bilevel.hypergradient` does with its ``upper_batch`` and ``lower_batch``). States are
plain tensors or dicts of tensors (the v of CG, the z of linear-system SGD), or None for the
stateless methods, so ``torch.func.vmap`` can take them.

``hvp_mode`` (cg, neumann, linear_sgd): "reverse", "forward", or None (default), the run's mode
(:func:`bilevel.oracles.second_order_mode`, which ``solve(..., hvp_mode=...)`` and
``bilevel run hvp_mode=...`` set for every estimator and oracle of the run).

Step sizes are plain numbers here; a solver resolves an ``"auto"`` step (:mod:`bilevel.spectrum`)
and schedules before it builds the estimator.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, Dict, NamedTuple, Optional, Tuple

import torch

from . import linear_system, tree
from .hypergrad import PerProduct, exact, fixed_point, implicit, itd
from .oracles import check_hvp_mode
from .tree import Tree


class Draw(NamedTuple):
    """Samples for one hypergradient: upper batch (grad f), Hessian batch (one for every product)
    or a :class:`~bilevel.hypergrad.PerProduct` of batches (one per product; ITD: one per unrolled
    step), cross batch, and the randomized Neumann term q (``None`` when the estimator has none)."""
    upper: Any
    hessian: Any
    cross: Any
    term: Optional[int] = None


def draw(problem, generator: torch.Generator, share_lower_batch: bool = False, *,
         products: Optional[int] = None, term: Optional[int] = None) -> Draw:
    """Draw, in this order, the upper batch, then the Hessian batch (``products=None``: one batch
    for every product) or ``products`` lower batches (one per product), then the cross batch.

    ``share_lower_batch``: the cross product reuses the (first) Hessian batch instead of drawing
    its own (with ``products=0`` one lower batch is drawn for it). ``term`` is stored as is.
    """
    upper = problem.sample("upper", generator)
    if products is None:
        hessian = problem.sample("lower", generator)
        first = hessian
    else:
        hessian = PerProduct(problem.sample("lower", generator) for _ in range(int(products)))
        first = hessian[0] if hessian else None
    if share_lower_batch:
        cross = first if products is None or hessian else problem.sample("lower", generator)
    else:
        cross = problem.sample("lower", generator)
    return Draw(upper, hessian, cross, term)


def draw_for(estimator, problem, generator: torch.Generator, share_lower_batch: bool = False) -> Draw:
    """The estimator's own :meth:`draw` when it has one (every estimator here does), else
    :func:`draw` (one Hessian batch): for estimator-like objects written elsewhere."""
    own = getattr(estimator, "draw", None)
    if own is not None:
        return own(problem, generator, share_lower_batch)
    return draw(problem, generator, share_lower_batch)


# ---------------------------------------------------------------------------------------------
# Option checks, run once per estimator object (in __post_init__).

def _invalid(owner: object, name: str, rule: str, value: Any) -> ValueError:
    return ValueError(f"{type(owner).__name__}: {name} must be {rule}, got {value!r}")


def _check_step_size(owner: object, name: str, optional: bool = False) -> None:
    """A positive finite number (a 0-d tensor is taken as is, unread: no host synchronisation)."""
    value = getattr(owner, name)
    if value is None and optional:
        return
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point():
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        rule = "a positive number" + (" or None" if optional else "")
        if isinstance(value, str):
            rule += " (a solver resolves 'auto' and schedules before building the estimator)"
        raise _invalid(owner, name, rule, value)


def _check_count(owner: object, name: str, minimum: int) -> None:
    value = getattr(owner, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _invalid(owner, name, f"an integer >= {minimum}", value)


def _check_choice(owner: object, name: str, choices) -> None:
    value = getattr(owner, name)
    if value not in choices:
        raise _invalid(owner, name, f"one of {list(choices)}", value)


def _check_flag(owner: object, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(owner, name), bool):
            raise _invalid(owner, name, "True or False", getattr(owner, name))


def _check_tolerance(owner: object, name: str = "tol") -> None:
    value = getattr(owner, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
        raise _invalid(owner, name, "a finite number >= 0", value)


def _check_hvp_mode(owner: object) -> None:
    check_hvp_mode(owner.hvp_mode, f"{type(owner).__name__}: hvp_mode")


# ---------------------------------------------------------------------------------------------
# The estimators.

class Estimator:
    """The protocol's defaults: no state, one Hessian batch per draw (:func:`draw`).

    Class attributes describe the estimator to :func:`bilevel.hypergradient`: ``ENTRY_FIXED``
    fields it sets itself (how to sample: its batches are given), ``ENTRY_DEFAULTS`` its own
    defaults where they differ from a solver's, ``ENTRY_INPUTS`` the inputs it accepts beside
    the fields (``init``: the state; ``generator``: for :meth:`given`)."""
    ENTRY_FIXED: ClassVar[Dict[str, Any]] = {}
    ENTRY_DEFAULTS: ClassVar[Dict[str, Any]] = {}
    ENTRY_INPUTS: ClassVar[Tuple[str, ...]] = ()

    def init(self, x: Tree, y: Tree) -> Any:
        return None

    def draw(self, problem, generator: torch.Generator, share_lower_batch: bool = False) -> Draw:
        return draw(problem, generator, share_lower_batch)

    def given(self, upper_batch: Any, lower_batch: Any, generator: Optional[torch.Generator] = None) -> Draw:
        """The draw of given batches: ``lower_batch`` for every Hessian product and the cross
        product; random choices of the estimator's own (none here) from ``generator``."""
        return Draw(upper_batch, lower_batch, lower_batch)


@dataclass(frozen=True)
class Exact(Estimator):
    """Dense d2_yy g and d2_xy g and ``torch.linalg.solve`` (:func:`bilevel.hypergrad.exact`):
    the reference for small problems and tests. Hessian on the draw's Hessian batch, cross
    Jacobian on its cross batch (one Jacobian when they are the same batch). No state."""

    def __call__(self, problem, x, y, state, sample: Draw):
        if isinstance(sample.hessian, PerProduct):
            raise ValueError("Exact: the dense solve takes one Hessian batch, got per-product batches")
        return exact(problem, x, y, sample.upper, sample.hessian, sample.cross)[0], state


@dataclass(frozen=True)
class ConjugateGradient(Estimator):
    """v by ``steps`` CG iterations (:func:`bilevel.linear_system.conjugate_gradient`: stop at
    ||r|| <= tol ||b||; ``negative_curvature`` "raise" or "truncate"), warm-started from the
    previous v (the state) when ``warm_start``. State: v, zeros at init (a tree of tensors from
    the start, as vmap needs; the first solve then starts from v = 0, whose residual b - A 0 = b
    costs one product, as every later warm start does), None without ``warm_start``."""
    steps: int = 10
    warm_start: bool = True
    tol: float = 0.0
    hvp_mode: Optional[str] = None
    negative_curvature: str = "raise"

    ENTRY_FIXED = {"warm_start": True}
    ENTRY_INPUTS = ("init",)

    def __post_init__(self):
        _check_count(self, "steps", 1)
        _check_flag(self, "warm_start")
        _check_tolerance(self)
        _check_hvp_mode(self)
        _check_choice(self, "negative_curvature", linear_system.NEGATIVE_CURVATURE)

    def init(self, x: Tree, y: Tree) -> Optional[Tree]:
        return tree.zeros_like(y) if self.warm_start else None

    def __call__(self, problem, x, y, v_prev, sample: Draw):
        init = v_prev if self.warm_start else None

        def solve(matvec, b):
            return linear_system.conjugate_gradient(matvec, b, steps=self.steps, init=init, tol=self.tol,
                                                    negative_curvature=self.negative_curvature)
        return implicit(problem, x, y, sample.upper, sample.hessian, sample.cross, solve, self.hvp_mode)


@dataclass(frozen=True)
class Neumann(Estimator):
    """v from a truncated Neumann series of ``steps`` Hessian-vector products (``variant`` "sum",
    "randomized" or a ``code_n*``; see :func:`bilevel.linear_system.neumann_series`), no state.

    ``resample=True`` (default): a fresh lower batch per product, as in StocBiO (Ji et al. 2021,
    Algorithm 2), Ghadimi and Wang's HIA (2018, Algorithm 3) and benchopt's ``shia``/``hia``.
    ``False``: all products on one batch, a biased estimate (the mean of one batch's powers is
    not the powers of the mean Hessian): on benchopt's quadratic (d = 100, n = 1024, batch 64,
    lr = 1/L of the mean Hessian; 100 draws) 10 products on one batch were 15% (+-9%) off the
    mean-Hessian series and 30 products a factor 1750 off (a batch Hessian's larger eigenvalues
    make I - lr H_b expand), fresh batches 0.7% (+-0.6%) and 0.8% (+-0.8%).
    ``lr`` must be a number (a solver resolves "auto" first)."""
    lr: float
    steps: int = 10
    variant: str = "sum"
    hvp_mode: Optional[str] = None
    resample: bool = True

    ENTRY_FIXED = {"resample": False}
    ENTRY_INPUTS = ("generator",)

    def __post_init__(self):
        _check_step_size(self, "lr")
        _check_choice(self, "variant", linear_system.NEUMANN_VARIANTS)
        _check_count(self, "steps", 0 if self.variant in ("sum", "randomized") else 1)
        _check_hvp_mode(self)
        _check_flag(self, "resample")

    @property
    def randomized(self) -> bool:
        return self.variant in linear_system.RANDOMIZED_NEUMANN

    def _term(self, generator) -> Optional[int]:
        return linear_system.draw_neumann_term(self.steps, generator, self.variant) if self.randomized else None

    def draw(self, problem, generator: torch.Generator, share_lower_batch: bool = False) -> Draw:
        """q first (randomized variants, from the run's generator), then :func:`draw` with one
        batch per product when ``resample``."""
        term = self._term(generator)
        products = linear_system.neumann_products(self.steps, self.variant, term) if self.resample else None
        return draw(problem, generator, share_lower_batch, products=products, term=term)

    def given(self, upper_batch, lower_batch, generator=None) -> Draw:
        """Given batches, q (randomized variants) from ``generator``."""
        return Draw(upper_batch, lower_batch, lower_batch, self._term(generator))

    def __call__(self, problem, x, y, state, sample: Draw):
        if self.randomized and sample.term is None:
            raise ValueError(f"the {self.variant!r} Neumann variant needs the draw's term q; "
                             "make the draw with this estimator's draw()")

        def solve(matvec, b):
            return linear_system.neumann_series(matvec, b, steps=self.steps, lr=self.lr, variant=self.variant,
                                                term=sample.term)
        h, _ = implicit(problem, x, y, sample.upper, sample.hessian, sample.cross, solve, self.hvp_mode)
        return h, state


@dataclass(frozen=True)
class LinearSystemSGD(Estimator):
    """z <- z - lr (H z - grad_y f) for ``steps`` steps from the previous z, optional projection
    onto a ball of ``radius``; the hypergradient uses the updated z. ``resample``: a fresh lower
    batch for each step's product, drawn up front (AmIGO's stochastic linear-system steps).
    Needs lr < 2/L, L the largest eigenvalue of the batch Hessians (see
    :mod:`bilevel.spectrum` for ``"auto"``, resolved by the solver). State: z (zeros at init)."""
    lr: float
    steps: int = 1
    radius: Optional[float] = None
    hvp_mode: Optional[str] = None
    resample: bool = False

    ENTRY_FIXED = {"resample": False}
    ENTRY_DEFAULTS = {"steps": 10}
    ENTRY_INPUTS = ("init",)

    def __post_init__(self):
        _check_step_size(self, "lr")
        _check_count(self, "steps", 0)
        _check_step_size(self, "radius", optional=True)
        _check_hvp_mode(self)
        _check_flag(self, "resample")

    def init(self, x: Tree, y: Tree) -> Tree:
        return tree.zeros_like(y)

    def draw(self, problem, generator: torch.Generator, share_lower_batch: bool = False) -> Draw:
        return draw(problem, generator, share_lower_batch, products=self.steps if self.resample else None)

    def __call__(self, problem, x, y, z, sample: Draw):
        def solve(matvec, b):
            return linear_system.linear_sgd(matvec, b, steps=self.steps, lr=self.lr, init=z, radius=self.radius)
        return implicit(problem, x, y, sample.upper, sample.hessian, sample.cross, solve, self.hvp_mode)


@dataclass(frozen=True)
class FixedPoint(Estimator):
    """v_{k+1} = (d_y T)^T v_k + grad_y f for the lower map T (``problem.lower_map`` or
    y - lr grad_y g), ``steps`` iterations or until ||v_{k+1} - v_k|| <= tol ||v_k||
    (:func:`bilevel.hypergrad.fixed_point`), warm-started from the previous v when
    ``warm_start``. The map is taken on one lower batch (the draw's Hessian batch; its draw shares
    it with the cross product). State: v, None before the first call."""
    steps: int = 10
    lr: Optional[float] = None
    tol: float = 0.0
    warm_start: bool = True

    ENTRY_FIXED = {"warm_start": True}
    ENTRY_INPUTS = ("init",)

    def __post_init__(self):
        _check_count(self, "steps", 1)
        _check_step_size(self, "lr", optional=True)
        _check_tolerance(self)
        _check_flag(self, "warm_start")

    def draw(self, problem, generator: torch.Generator, share_lower_batch: bool = True) -> Draw:
        return draw(problem, generator, True)

    def __call__(self, problem, x, y, v_prev, sample: Draw):
        return fixed_point(problem, x, y, sample.upper, sample.hessian, steps=self.steps, lr=self.lr,
                           tol=self.tol, init=v_prev if self.warm_start else None)


@dataclass(frozen=True)
class ITD(Estimator):
    """Reverse mode through ``steps`` unrolled lower SGD steps of size ``lr`` from y, only the
    last ``truncate`` differentiated (:func:`bilevel.hypergrad.itd`). Its draw holds one lower
    batch per step (drawn first, as ITD-BiO does) and then the upper batch. No state."""
    lr: float
    steps: int = 10
    truncate: Optional[int] = None

    def __post_init__(self):
        _check_step_size(self, "lr")
        _check_count(self, "steps", 1)
        if self.truncate is not None:
            value = self.truncate
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= self.steps:
                raise _invalid(self, "truncate", f"None or an integer in [0, steps = {self.steps}]", value)

    def draw(self, problem, generator: torch.Generator, share_lower_batch: bool = False) -> Draw:
        lowers = PerProduct(problem.sample("lower", generator) for _ in range(self.steps))
        return Draw(problem.sample("upper", generator), lowers, None)

    def given(self, upper_batch, lower_batch, generator=None) -> Draw:
        return Draw(upper_batch, PerProduct([lower_batch] * self.steps), None)

    def __call__(self, problem, x, y, state, sample: Draw):
        if not isinstance(sample.hessian, PerProduct) or len(sample.hessian) != self.steps:
            raise ValueError(f"ITD: the draw must hold steps = {self.steps} lower batches (PerProduct), "
                             f"got {sample.hessian!r}")
        return itd(problem, x, y, sample.upper, list(sample.hessian), lr=self.lr, truncate=self.truncate)[0], state


#: The hypergradient methods, by the name :func:`bilevel.hypergradient` takes.
METHODS: Dict[str, type] = {
    "exact": Exact, "cg": ConjugateGradient, "neumann": Neumann, "linear_sgd": LinearSystemSGD,
    "itd": ITD, "fixed_point": FixedPoint,
}

_ENTRY_OPTIONS: Dict[str, Dict[str, Any]] = {}


def entry_options(method: str) -> Dict[str, Any]:
    """The options ``method`` takes in :func:`bilevel.hypergradient` and their defaults
    (``inspect.Parameter.empty``: required): the class's fields but ``ENTRY_FIXED``, with
    ``ENTRY_DEFAULTS``, plus ``ENTRY_INPUTS`` (default None). Read once per method."""
    options = _ENTRY_OPTIONS.get(method)
    if options is None:
        if method not in METHODS:
            raise ValueError(f"unknown hypergradient method {method!r}; valid: {', '.join(METHODS)}")
        cls = METHODS[method]
        options = {f.name: cls.ENTRY_DEFAULTS.get(f.name, inspect.Parameter.empty if f.default is MISSING else f.default)
                   for f in fields(cls) if f.name not in cls.ENTRY_FIXED}
        options.update({name: None for name in cls.ENTRY_INPUTS})
        _ENTRY_OPTIONS[method] = options
    return options


def from_options(method: str, options: Dict[str, Any]) -> Tuple[Estimator, Any, Optional[torch.Generator]]:
    """(estimator, init state, generator) for :func:`bilevel.hypergradient`'s ``method`` and
    ``options``. Unknown or missing options: TypeError naming them and the valid ones; values
    are checked by the estimator's constructor (ValueError naming field and rule). The object
    for hashable option values is built once and reused (they are immutable)."""
    cls = METHODS.get(method)
    fields = options
    for name in (cls.ENTRY_INPUTS if cls is not None else ()):
        if name in options:  # the inputs (init, generator) are not fields: not in the cache key
            fields = {k: v for k, v in options.items() if k not in cls.ENTRY_INPUTS}
            break
    items = tuple(fields.items())  # in the caller's order: another order is another cache entry
    try:
        # the types in the key: 1, 1.0 and True hash alike, but only some of them are valid; the
        # class too: METHODS may be replaced
        estimator = _build_cached(method, cls, items, tuple(map(type, fields.values())))
    except TypeError as error:
        if "unhashable" not in str(error):
            raise
        estimator = _build(method, items)  # e.g. a list option
    return estimator, options.get("init"), options.get("generator")


@functools.lru_cache(maxsize=256)
def _build_cached(method: str, cls: type, items: Tuple[Tuple[str, Any], ...], types: Tuple[type, ...]) -> Estimator:
    return _build(method, items)


def _build(method: str, items: Tuple[Tuple[str, Any], ...]) -> Estimator:
    accepted, given = entry_options(method), dict(items)
    cls = METHODS[method]
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise TypeError(f"hypergradient method {method!r} got unknown option(s) {unknown}; "
                        f"valid: {sorted(accepted)}")
    missing = sorted(k for k, d in accepted.items() if d is inspect.Parameter.empty and k not in given)
    if missing:
        raise TypeError(f"hypergradient method {method!r} needs option(s) {missing} "
                        "(lr: a step size below 2/L, L the largest eigenvalue of d2_yy g on lower_batch)")
    return cls(**{**cls.ENTRY_DEFAULTS, **given, **cls.ENTRY_FIXED})

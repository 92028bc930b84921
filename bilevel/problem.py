"""The bilevel problem protocol.

    min_x  Phi(x) = f(x, y*(x)),      y*(x) = argmin_y g(x, y)

A problem supplies the upper loss f (``upper_loss``), the lower loss g (``lower_loss``), a
starting point (``init``), mini-batches (``sample``) and metrics (``evaluate``). Variables x and y
are dicts of tensors; a module-based problem turns its modules into functions with
``torch.func.functional_call``. Batches are opaque to the solvers: whatever ``sample`` returns is
handed back, untouched, to the losses.

Devices: a problem lives on one device (:mod:`bilevel.device`): ``problem.to("cuda")`` moves
every tensor and module it holds, once. ``init`` and ``sample`` make their tensors on the
problem's device; a random draw passes ``device=generator.device`` (the run's generator lives on
the problem's device).
"""
from __future__ import annotations

import abc
import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import tree
from .device import same_device
from .tree import Tree

LEVELS = ("upper", "lower")


class BilevelProblem(abc.ABC):
    """Base class for bilevel problems.

    Subclasses implement :meth:`upper_loss`, :meth:`lower_loss` and :meth:`init`; they override
    :meth:`sample` when the losses are stochastic and :meth:`evaluate` to report metrics.
    """

    #: Short name used in logs and the registry.
    name: str = "custom"

    @abc.abstractmethod
    def upper_loss(self, x: Tree, y: Tree, batch: Any) -> Tensor:
        """f(x, y; batch): a 0-d tensor."""

    @abc.abstractmethod
    def lower_loss(self, x: Tree, y: Tree, batch: Any) -> Tensor:
        """g(x, y; batch): a 0-d tensor, (ideally strongly) convex in y."""

    @abc.abstractmethod
    def init(self, generator: torch.Generator) -> Tuple[Tree, Tree]:
        """Initial (x0, y0)."""

    def sample(self, level: str, generator: torch.Generator) -> Any:
        """A mini-batch for ``level`` in {"upper", "lower"}; ``None`` for deterministic losses."""
        check_level(level)
        return None

    def evaluate(self, x: Tree, y: Tree) -> Dict[str, float]:
        """Metrics at (x, y); must not modify x or y."""
        return {}

    def to(self, device) -> "BilevelProblem":
        """This problem with every tensor and ``nn.Module`` it holds on ``device`` ("cpu",
        "cuda", "cuda:N"; None: cuda when available): a copy, or ``self`` when everything is
        there already (:func:`bilevel.device.to_device`). Tensors a problem makes inside its
        methods must follow their inputs (``device=generator.device``, ``like.device``)."""
        from .device import to_device
        return to_device(self, device)


def check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")


class FunctionProblem(BilevelProblem):
    """A problem given as two plain functions.

    Example::

        problem = FunctionProblem(
            upper_loss=lambda x, y, batch: ((y["w"] - 1) ** 2).sum() + (x["l"] ** 2).sum(),
            lower_loss=lambda x, y, batch: ((y["w"] - x["l"]) ** 2).sum(),
            x0={"l": torch.zeros(3)}, y0={"w": torch.zeros(3)},
        )
    """

    def __init__(
        self,
        upper_loss: Callable[[Tree, Tree, Any], Tensor],
        lower_loss: Callable[[Tree, Tree, Any], Tensor],
        x0,
        y0,
        sample: Optional[Callable[[str, torch.Generator], Any]] = None,
        evaluate: Optional[Callable[[Tree, Tree], Dict[str, float]]] = None,
        name: str = "custom",
    ):
        self._upper, self._lower = upper_loss, lower_loss
        self._x0, self._y0 = tree.as_tree(x0, "x0"), tree.as_tree(y0, "y0")
        self._sample, self._evaluate = sample, evaluate
        self.name = name

    def upper_loss(self, x, y, batch):
        return self._upper(x, y, batch)

    def lower_loss(self, x, y, batch):
        return self._lower(x, y, batch)

    def init(self, generator):
        return tree.clone(self._x0), tree.clone(self._y0)

    def sample(self, level, generator):
        check_level(level)
        return self._sample(level, generator) if self._sample else None

    def evaluate(self, x, y):
        return dict(self._evaluate(x, y)) if self._evaluate else {}


class ProblemError(ValueError):
    """A problem definition does not satisfy the protocol."""


def validate(problem: BilevelProblem, x: Tree, y: Tree, generator: torch.Generator) -> None:
    """Check, before any work, that the problem's pieces fit together.

    Raises :class:`ProblemError` naming the problem and the method when x or y is not a dict of
    tensors, when a loss is not a finite 0-d tensor, when the upper loss has no autograd graph
    through x or y (detached), when the lower loss does not depend on y, or when x, y or a loss
    is not on the run's device (the generator's).
    """
    label = f"problem {getattr(problem, 'name', type(problem).__name__)!r}"
    for name, var in (("x", x), ("y", y)):
        if not isinstance(var, dict) or not var or not all(isinstance(v, Tensor) for v in var.values()):
            raise ProblemError(f"{label}: init() must return x and y as non-empty dicts of tensors; {name} is {var!r:.80}")
        for key, value in var.items():
            if not value.is_floating_point():
                raise ProblemError(f"{label}: {name}[{key!r}] has dtype {value.dtype}; variables must be floating point")
            if not same_device(value.device, generator.device):
                raise ProblemError(f"{label}: init() returned {name}[{key!r}] on {value.device}, but the run is on "
                                   f"{generator.device} (its generator's device): make it with "
                                   "device=generator.device")
    x_leaves = {k: v.detach().requires_grad_(True) for k, v in x.items()}
    y_leaves = {k: v.detach().requires_grad_(True) for k, v in y.items()}
    for level, loss_fn in (("upper", problem.upper_loss), ("lower", problem.lower_loss)):
        batch = problem.sample(level, generator)
        try:
            value = loss_fn(x_leaves, y_leaves, batch)
        except Exception as exc:  # re-raised with context: which loss, which problem
            raise ProblemError(f"{label}: {level}_loss(x, y, batch) failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(value, Tensor) or value.dim() != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ProblemError(f"{label}: {level}_loss must return a 0-d tensor, got {shape}")
        device = next(iter(x_leaves.values())).device
        if value.device != device:
            raise ProblemError(f"{label}: {level}_loss returned a tensor on {value.device} while x and y are on "
                               f"{device}: a tensor the problem holds is on another device (build the "
                               f"problem with device=..., or problem.to({str(device)!r}))")
        if not math.isfinite(float(value.detach())):
            raise ProblemError(f"{label}: {level}_loss is {float(value.detach())} at the initial point")
        inputs = y_leaves if level == "lower" else {**{f"x.{k}": v for k, v in x_leaves.items()},
                                                    **{f"y.{k}": v for k, v in y_leaves.items()}}
        if not value.requires_grad:
            raise ProblemError(f"{label}: {level}_loss(x, y, batch) returned a tensor without an autograd graph: "
                               f"it does not depend on {'y' if level == 'lower' else 'x or y'} (a .detach(), "
                               ".item(), float() or torch.no_grad() inside it?)")
        grads = torch.autograd.grad(value, list(inputs.values()), allow_unused=True)
        if all(g is None for g in grads):
            raise ProblemError(f"{label}: {level}_loss(x, y, batch) does not depend on "
                               f"{'y' if level == 'lower' else 'x or y'}; solvers differentiate it")

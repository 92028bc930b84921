"""Hypergradient estimators.

    grad Phi(x) = grad_x f(x, y) - d2_xy g(x, y) . v,        d2_yy g(x, y) . v = grad_y f(x, y)

evaluated at the current lower iterate y (exact at y = y*(x)). Methods:

* ``exact``       dense Hessian and cross Jacobian, ``torch.linalg.solve`` (small problems, tests).
* ``cg``          v by conjugate gradient.
* ``neumann``     v by a truncated Neumann series of ``steps`` products, textbook sum or
                  randomized (Ghadimi-Wang).
* ``linear_sgd``  v by SGD on 1/2 <v, A v> - <b, v>, warm-startable, optional projection.
* ``fixed_point`` v = (d_y T)^T v + grad_y f for the lower fixed-point map
                  T(x, y) = y - lr grad_y g (or the problem's ``lower_map``); then
                  grad Phi = grad_x f + (d_x T)^T v   (hypertorch's fixed-point method).
* ``itd``         reverse mode through ``steps`` unrolled lower SGD steps from y:
                  d/dx f(x, y_K(x)), y_{k+1} = y_k - lr grad_y g(x, y_k); ``truncate`` keeps only
                  the last steps in the graph.

:func:`hypergradient` is the one-call entry point; :func:`implicit` is the building block that
solvers combine with their own batches and warm starts.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from . import linear_system, tree
from .oracles import LowerProducts, _leaves, _record, _scalar, grad_upper, second_order
from .tree import Tree

LinearSolver = Callable[..., Tree]


class PerProduct(tuple):
    """Lower batches for the Hessian-vector products of one linear solve, the k-th product on the
    k-th batch: a fresh batch per product, as in Ghadimi and Wang's estimator (2018, Algorithm 3),
    StocBiO (Ji et al. 2021, Algorithm 2) and benchopt's ``hia``/``shia``. The batches are drawn
    up front (:mod:`bilevel.estimators`), so a second solve on the same draw at another point
    uses exactly the same ones."""

    def __repr__(self) -> str:
        return f"PerProduct({len(self)} batches)"


def implicit(problem, x: Tree, y: Tree, upper_batch: Any, hessian_batch: Any, cross_batch: Any,
             solve: Callable[[Callable[[Tree], Tree], Tree], Tree],
             hvp_mode: str = "reverse") -> Tuple[Tree, Tree]:
    """Implicit hypergradient ``grad_x f - d2_xy g . v`` with ``v = solve(matvec, grad_y f)``.

    ``solve`` is any linear-system solver closed over its options (see
    :mod:`bilevel.linear_system`). The Hessian products use ``hessian_batch`` (all of them; or,
    given a :class:`PerProduct`, the k-th product its k-th batch; a ValueError when the solver
    asks for more products than there are batches) and the cross product ``cross_batch``
    (independent draws unless the caller passes the same one).
    Each distinct batch object gets one lower-gradient graph
    (:class:`~bilevel.oracles.LowerProducts`): all products on one shared batch, and the cross
    product when it is that batch, cost one lower forward; the values and oracle counts are
    those of one :func:`~bilevel.oracles.hvp` / :func:`~bilevel.oracles.cross` call per product.
    Returns ``(hypergradient, v)``.
    """
    gx_f, gy_f = grad_upper(problem, x, y, upper_batch)
    per_product = isinstance(hessian_batch, PerProduct)
    # One gradient graph per distinct batch object: every product on the shared Hessian batch
    # (and the cross product when it is the same batch) comes from one lower forward. A
    # per-product batch used by no other product gets a graph of its own, dropped after use.
    kept = []

    def products_on(batch) -> LowerProducts:
        for held, products in kept:
            if held is batch:
                return products
        products = LowerProducts(problem, x, y, batch, hvp_mode)
        if batch is cross_batch or not per_product:
            kept.append((batch, products))
        return products

    used = 0

    def matvec(u: Tree) -> Tree:
        nonlocal used
        batch = hessian_batch
        if per_product:
            if used >= len(hessian_batch):
                raise ValueError(f"the linear solver asked for Hessian-vector product {used + 1} but the "
                                 f"draw holds {len(hessian_batch)} per-product batches")
            batch = hessian_batch[used]
        used += 1
        return products_on(batch).hvp(u)

    v = solve(matvec, gy_f)
    kept[:] = [entry for entry in kept if entry[0] is cross_batch]  # free the Hessian batch's graph first
    return tree.sub(gx_f, products_on(cross_batch).cross(v)), v


#: Largest dense [d2_yy g, d2_yx g] block ``exact`` builds (bytes); larger problems get an error.
MAX_DENSE_BYTES = 2 * 1024 ** 3
#: Rows of the dense Jacobians computed per vectorized backward pass (bounds peak memory).
JACOBIAN_CHUNK = 64


def exact(problem, x: Tree, y: Tree, upper_batch: Any, lower_batch: Any) -> Tuple[Tree, Tree]:
    """Dense implicit hypergradient: builds d2_yy g and d2_xy g explicitly (reverse-over-reverse
    Jacobians of the flattened gradient, ``JACOBIAN_CHUNK`` rows at a time) and solves with
    ``torch.linalg.solve``.

    Memory grows as dim(y) (dim(y) + dim(x)): meant for small problems and as the reference in
    tests; beyond ``MAX_DENSE_BYTES`` it raises a ValueError naming the sizes (use ``cg``).
    Returns ``(hypergradient, v)``.
    """
    xf, yf = tree.flatten(x).detach(), tree.flatten(y).detach()
    needed = yf.numel() * (yf.numel() + xf.numel()) * yf.element_size()
    if needed > MAX_DENSE_BYTES:
        raise ValueError(f"exact hypergradient: the dense d2_yy g and d2_xy g of dim(y) = {yf.numel()}, "
                         f"dim(x) = {xf.numel()} need {needed / 1024 ** 3:.1f} GiB (limit "
                         f"{MAX_DENSE_BYTES / 1024 ** 3:.0f} GiB); use method='cg' or a smaller problem")

    def lower_flat(xv, yv):
        return _scalar(problem.lower_loss(tree.unflatten(xv, x), tree.unflatten(yv, y), lower_batch), "lower_loss")

    with second_order(problem):  # twice-differentiable kernels (attention, RNNs)
        cross_jac, hessian = torch.func.jacrev(torch.func.grad(lower_flat, argnums=1), argnums=(0, 1),
                                               chunk_size=JACOBIAN_CHUNK)(xf, yf)
    gx_f, gy_f = grad_upper(problem, x, y, upper_batch)
    try:
        v = torch.linalg.solve(hessian, tree.flatten(gy_f))
    except RuntimeError as exc:
        raise ValueError(f"exact hypergradient: the lower Hessian d2_yy g is singular ({exc})") from exc
    h = tree.flatten(gx_f) - cross_jac.T @ v
    return tree.unflatten(h, x), tree.unflatten(v, y)


def itd(problem, x: Tree, y: Tree, upper_batch: Any, lower_batches: Sequence[Any], *, lr: float,
        truncate: Optional[int] = None) -> Tuple[Tree, Tree]:
    """Iterative differentiation: d/dx f(x, y_K(x)) by reverse mode through the unrolled loop

        y_0 = y,   y_{k+1} = y_k - lr grad_y g(x, y_k; lower_batches[k]),   k < K = len(lower_batches)

    With ``truncate = T`` only the last T steps are differentiated (the first K - T run without a
    graph), as in truncated back-propagation (Shaban et al. 2019). Counts K lower gradients, one
    upper gradient, and one HVP plus one cross product per differentiated step.
    Returns ``(hypergradient, y_K)`` with y_K detached.
    """
    steps = len(lower_batches)
    if steps < 1:
        raise ValueError("itd needs at least one unrolled step")
    kept = steps if truncate is None else int(truncate)
    if not 0 <= kept <= steps:
        raise ValueError(f"truncate must lie in [0, {steps}], got {truncate}")
    xl = _leaves(x)
    y_k = {k: v.detach() for k, v in y.items()}
    for k, batch in enumerate(lower_batches):
        differentiate = k >= steps - kept
        _record("grad_lower")
        if differentiate:
            _record("hvp"), _record("cross")
            y_in = {n: (v if v.requires_grad else v.detach().requires_grad_(True)) for n, v in y_k.items()}
            with second_order(problem):  # twice-differentiable kernels (attention, RNNs)
                loss = _scalar(problem.lower_loss(xl, y_in, batch), "lower_loss")
                gy = torch.autograd.grad(loss, list(y_in.values()), create_graph=True, allow_unused=True,
                                         materialize_grads=True)
            y_k = {n: y_in[n] - lr * g for n, g in zip(y_in, gy)}
        else:
            y_in = _leaves(y_k)
            loss = _scalar(problem.lower_loss({n: v.detach() for n, v in x.items()}, y_in, batch), "lower_loss")
            gy = torch.autograd.grad(loss, list(y_in.values()), allow_unused=True, materialize_grads=True)
            y_k = {n: (y_in[n] - lr * g).detach() for n, g in zip(y_in, gy)}
    _record("grad_upper")
    value = _scalar(problem.upper_loss(xl, y_k, upper_batch), "upper_loss")
    grads = torch.autograd.grad(value, list(xl.values()), allow_unused=True, materialize_grads=True)
    return {k: g.detach() for k, g in zip(xl, grads)}, tree.detach(y_k)


def fixed_point(problem, x: Tree, y: Tree, upper_batch: Any, lower_batch: Any, *, steps: int = 10,
                lr: Optional[float] = None, tol: float = 0.0, init: Optional[Tree] = None) -> Tuple[Tree, Tree]:
    """Fixed-point implicit differentiation for y* = T(x, y*).

        v_{k+1} = (d_y T)^T v_k + grad_y f,        grad Phi = grad_x f + (d_x T)^T v_K

    T is ``problem.lower_map(x, y, batch)`` when the problem defines one, otherwise one gradient
    step ``T(x, y) = y - lr grad_y g(x, y)``. Stops early when ||v_{k+1} - v_k|| <= tol ||v_k||.
    Counts one HVP per iteration and one cross product (for the default map).
    Returns ``(hypergradient, v)``.
    """
    linear_system._check_steps(steps)
    gx_f, gy_f = grad_upper(problem, x, y, upper_batch)
    xl, yl = _leaves(x), _leaves(y)
    lower_map = getattr(problem, "lower_map", None)
    if lower_map is not None:
        mapped = lower_map(xl, yl, lower_batch)
    else:
        if lr is None:
            raise ValueError("fixed_point needs lr (the step of T = y - lr grad_y g) unless the problem defines lower_map")
        _record("grad_lower")
        with second_order(problem):  # twice-differentiable kernels (attention, RNNs)
            loss = _scalar(problem.lower_loss(xl, yl, lower_batch), "lower_loss")
            gy = torch.autograd.grad(loss, list(yl.values()), create_graph=True, allow_unused=True,
                                     materialize_grads=True)
        mapped = {k: yl[k] - lr * g for k, g in zip(yl, gy)}
    outputs = list(mapped.values())

    def transpose_jacobian(v: Tree, wrt: Tree) -> Tree:
        grads = torch.autograd.grad(outputs, list(wrt.values()), grad_outputs=[v[k] for k in mapped],
                                    retain_graph=True, allow_unused=True, materialize_grads=True)
        return {k: g.detach() for k, g in zip(wrt, grads)}

    v = tree.zeros_like(gy_f) if init is None else tree.clone(init)
    for _ in range(steps):
        _record("hvp")
        v_next = tree.add(transpose_jacobian(v, yl), gy_f)
        converged = float(tree.norm(tree.sub(v_next, v))) <= tol * float(tree.norm(v))
        v = v_next
        if converged:
            break
    _record("cross")
    return tree.add(gx_f, transpose_jacobian(v, xl)), v


# ---------------------------------------------------------------------------------------------
# One-call entry point.

def _cg(problem, x, y, ub, lb, *, steps=10, tol=0.0, init=None, hvp_mode="reverse", negative_curvature="raise"):
    return implicit(problem, x, y, ub, lb, lb, lambda mv, b: linear_system.conjugate_gradient(
        mv, b, steps=steps, init=init, tol=tol, negative_curvature=negative_curvature), hvp_mode)[0]


def _neumann(problem, x, y, ub, lb, *, lr, steps=10, variant="sum", generator=None, hvp_mode="reverse"):
    return implicit(problem, x, y, ub, lb, lb, lambda mv, b: linear_system.neumann_series(
        mv, b, steps=steps, lr=lr, variant=variant, generator=generator), hvp_mode)[0]


def _linear_sgd(problem, x, y, ub, lb, *, lr, steps=10, init=None, radius=None, hvp_mode="reverse"):
    return implicit(problem, x, y, ub, lb, lb, lambda mv, b: linear_system.linear_sgd(
        mv, b, steps=steps, lr=lr, init=init, radius=radius), hvp_mode)[0]


def _exact(problem, x, y, ub, lb):
    return exact(problem, x, y, ub, lb)[0]


def _itd(problem, x, y, ub, lb, *, lr, steps=10, truncate=None):
    return itd(problem, x, y, ub, [lb] * steps, lr=lr, truncate=truncate)[0]


def _fixed_point(problem, x, y, ub, lb, *, steps=10, lr=None, tol=0.0, init=None):
    return fixed_point(problem, x, y, ub, lb, steps=steps, lr=lr, tol=tol, init=init)[0]


METHODS: Dict[str, Callable[..., Tree]] = {
    "exact": _exact, "cg": _cg, "neumann": _neumann, "linear_sgd": _linear_sgd,
    "itd": _itd, "fixed_point": _fixed_point,
}


def method_options(method: str) -> Dict[str, Any]:
    """The options ``method`` accepts, with their defaults (``inspect.Parameter.empty``: required)."""
    if method not in METHODS:
        raise ValueError(f"unknown hypergradient method {method!r}; valid: {', '.join(METHODS)}")
    return dict(_options_of(METHODS[method]))


_OPTIONS: Dict[Callable[..., Tree], Dict[str, Any]] = {}


def _options_of(function: Callable[..., Tree]) -> Dict[str, Any]:
    """The keyword options of a METHODS entry, read from its signature once per function."""
    options = _OPTIONS.get(function)
    if options is None:
        params = list(inspect.signature(function).parameters.values())[5:]
        options = _OPTIONS[function] = {p.name: p.default for p in params}
    return options


def hypergradient(problem, x: Tree, y: Tree, upper_batch: Any = None, lower_batch: Any = None,
                  method: str = "cg", **options) -> Tree:
    """Estimate grad Phi(x) at the lower iterate y.

    Args:
        problem: a :class:`~bilevel.BilevelProblem`.
        x, y: dicts of tensors.
        upper_batch, lower_batch: passed untouched to the losses (``None`` for deterministic ones).
        method: one of ``exact, cg, neumann, linear_sgd, itd, fixed_point``.
        **options: ``steps`` (iterations, Neumann Hessian-vector products or unrolled steps),
            ``lr`` (step size, needed by neumann, linear_sgd and itd), and per method: ``tol``,
            ``init`` (warm start for cg, linear_sgd, fixed_point), ``variant`` ("sum" |
            "randomized") and ``generator`` for neumann, ``radius`` for linear_sgd, ``truncate`` for itd, ``hvp_mode``
            ("reverse" | "forward") for cg, neumann and linear_sgd.

    Returns:
        The hypergradient, a dict shaped like x.
    """
    accepted = method_options(method)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"hypergradient method {method!r} got unknown option(s) {unknown}; "
                        f"valid: {sorted(accepted)}")
    missing = sorted(k for k, d in accepted.items() if d is inspect.Parameter.empty and k not in options)
    if missing:
        raise TypeError(f"hypergradient method {method!r} needs option(s) {missing} "
                        "(lr: a step size below 2/L, L the largest eigenvalue of d2_yy g on lower_batch)")
    x, y = tree.as_tree(x, "x"), tree.as_tree(y, "y")
    return METHODS[method](problem, x, y, upper_batch, lower_batch, **options)

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

:func:`implicit`, :func:`exact`, :func:`itd` and :func:`fixed_point` are the mathematics. Each
method is ONE estimator object of :mod:`bilevel.estimators` (``METHODS``: name -> class) that
calls them; :func:`hypergradient` builds that object from ``method`` and its options, makes its
draw from the batches (and the generator) it is given, and calls it, as solvers do with draws
from their run's generator.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from . import linear_system, tree
from .oracles import LowerProducts, _leaves, _record, _scalar, grad_upper, resolve_mode, second_order
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
             hvp_mode: Optional[str] = None) -> Tuple[Tree, Tree]:
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
    ``hvp_mode``: "reverse", "forward" or None (the run's, :func:`bilevel.oracles.second_order_mode`).
    Returns ``(hypergradient, v)``.
    """
    hvp_mode = resolve_mode(hvp_mode)
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

    if per_product:
        used = 0

        def matvec(u: Tree) -> Tree:
            nonlocal used
            if used >= len(hessian_batch):
                raise ValueError(f"the linear solver asked for Hessian-vector product {used + 1} but the "
                                 f"draw holds {len(hessian_batch)} per-product batches")
            used += 1
            return products_on(hessian_batch[used - 1]).hvp(u)
    else:
        matvec = products_on(hessian_batch).hvp  # one graph, built at the first product

    v = solve(matvec, gy_f)
    matvec = None
    kept[:] = [entry for entry in kept if entry[0] is cross_batch]  # free the Hessian batch's graph first
    return tree.sub(gx_f, products_on(cross_batch).cross(v)), v


#: Largest dense [d2_yy g, d2_yx g] block ``exact`` builds (bytes); larger problems get an error.
MAX_DENSE_BYTES = 2 * 1024 ** 3
#: Rows of the dense Jacobians computed per vectorized backward pass (bounds peak memory).
JACOBIAN_CHUNK = 64


_SAME = object()


def exact(problem, x: Tree, y: Tree, upper_batch: Any, lower_batch: Any,
          cross_batch: Any = _SAME) -> Tuple[Tree, Tree]:
    """Dense implicit hypergradient: builds d2_yy g and d2_xy g explicitly (reverse-over-reverse
    Jacobians of the flattened gradient, ``JACOBIAN_CHUNK`` rows at a time) and solves with
    ``torch.linalg.solve``. d2_yy g is taken on ``lower_batch`` and d2_xy g on ``cross_batch``
    (default: the same batch, both from one Jacobian of grad_y g).

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
        if cross_batch is _SAME or cross_batch is lower_batch:
            cross_jac, hessian = torch.func.jacrev(torch.func.grad(lower_flat, argnums=1), argnums=(0, 1),
                                                   chunk_size=JACOBIAN_CHUNK)(xf, yf)
        else:
            def cross_flat(xv, yv):
                return _scalar(problem.lower_loss(tree.unflatten(xv, x), tree.unflatten(yv, y), cross_batch), "lower_loss")
            hessian = torch.func.jacrev(torch.func.grad(lower_flat, argnums=1), argnums=1,
                                        chunk_size=JACOBIAN_CHUNK)(xf, yf)
            cross_jac = torch.func.jacrev(torch.func.grad(cross_flat, argnums=1), argnums=0,
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
# One-call entry point: builds the method's estimator object and calls it once.

def method_options(method: str) -> Dict[str, Any]:
    """The options ``method`` accepts in :func:`hypergradient`, with their defaults
    (``inspect.Parameter.empty``: required): the fields of its estimator class that describe the
    estimate, plus ``generator`` (randomized estimators) and ``init`` (warm-startable ones).
    Read from the class once."""
    from . import estimators
    return dict(estimators.entry_options(method))


def hypergradient(problem, x: Tree, y: Tree, upper_batch: Any = None, lower_batch: Any = None,
                  method: str = "cg", **options) -> Tree:
    """Estimate grad Phi(x) at the lower iterate y.

    Args:
        problem: a :class:`~bilevel.BilevelProblem`.
        x, y: dicts of tensors.
        upper_batch, lower_batch: passed untouched to the losses (``None`` for deterministic ones);
            every Hessian-vector product and the cross product use ``lower_batch``.
        method: one of ``exact, cg, neumann, linear_sgd, itd, fixed_point`` (the estimator
            classes of :mod:`bilevel.estimators`).
        **options: the estimator's fields (checked when it is built: an unknown name is a
            TypeError listing the valid ones, a bad value a ValueError naming field and rule):
            ``steps`` (iterations, Neumann Hessian-vector products or unrolled steps), ``lr``
            (step size, needed by neumann, linear_sgd and itd), and per method: ``tol``,
            ``variant`` ("sum" | "randomized" | ``code_n*``) for neumann, ``radius`` for
            linear_sgd, ``truncate`` for itd, ``negative_curvature`` for cg, ``hvp_mode``
            ("reverse" | "forward"; None: the run's) for cg, neumann and linear_sgd; and two
            inputs that are not fields: ``init`` (warm start v or z for cg, linear_sgd,
            fixed_point: the estimator's state) and ``generator`` (the random Neumann term).

    Returns:
        The hypergradient, a dict shaped like x.
    """
    from . import estimators
    estimator, init, generator = estimators.from_options(method, options)
    x, y = tree.as_tree(x, "x"), tree.as_tree(y, "y")
    draw = estimator.given(upper_batch, lower_batch, generator)
    return estimator(problem, x, y, init, draw)[0]


def __getattr__(name: str):
    if name == "METHODS":  # the table lives with the estimator classes (imported lazily: no cycle)
        from . import estimators
        return estimators.METHODS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Solvers for the linear system of implicit differentiation.

    A v = b,      A = d2_yy g(x, y)  (symmetric, positive definite when g is strongly convex in y)
                  b = grad_y f(x, y)

Every solver has the same shape, ``solver(matvec, b, **options) -> v``, where ``matvec(u)``
returns ``A u`` (one Hessian-vector product) and ``b`` is a tree. They are interchangeable in
:func:`bilevel.hypergrad.implicit`, as in jaxopt's ``implicit_diff``.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, List, Optional

import torch

from . import tree
from .upper import clip_each
from .tree import Tree

Matvec = Callable[[Tree], Tree]
NEUMANN_VARIANTS = ("sum", "randomized", "code_n1", "code_n2", "code_n3", "code_n4")
RANDOMIZED_NEUMANN = ("randomized", "code_n1")


NEGATIVE_CURVATURE = ("raise", "truncate")


class TruncationLog:
    """Negative-curvature truncations of CG inside one run (see :func:`truncation_warnings`)."""

    def __init__(self):
        self.count = 0


_RUNS: List[TruncationLog] = []


@contextlib.contextmanager
def truncation_warnings() -> Iterator[TruncationLog]:
    """One run's scope for the truncated-CG warning: inside it, the first truncation warns and
    later ones are only counted (``log.count``). :func:`bilevel.solve` opens one per call, so each
    run warns at most once; a call outside any scope warns on every truncation."""
    log = TruncationLog()
    _RUNS.append(log)
    try:
        yield log
    finally:
        _RUNS.remove(log)


def _report_truncation(curvature, iteration: int, stacklevel: int = 3) -> None:
    runs = _RUNS[-1:]
    first = not runs or runs[0].count == 0
    for log in runs:
        log.count += 1
    if first:
        fallback = "the right-hand side b (A taken as the identity)" if iteration == 0 else \
            f"the CG iterate after {iteration} positive-curvature steps"
        warnings.warn(
            f"conjugate gradient truncated at non-positive curvature <p, A p> = {float(curvature):.3e} "
            f"(iteration {iteration}): the lower-level Hessian is not positive definite here; returning "
            f"{fallback}. Reported once per run; later truncations are counted silently.",
            RuntimeWarning, stacklevel=stacklevel)


def conjugate_gradient(matvec: Matvec, b: Tree, *, steps: int = 10, init: Optional[Tree] = None,
                       tol: float = 0.0, negative_curvature: str = "raise",
                       host_sync: Optional[bool] = None) -> Tree:
    """Conjugate gradient, at most ``steps`` products, stopping when ||r|| <= max(tol, eps) ||b||
    (eps: the dtype's machine epsilon, below which the recursion only amplifies round-off).

        r_0 = b - A v_0,  p_0 = r_0
        alpha_k = <r_k, r_k> / <p_k, A p_k>
        v_{k+1} = v_k + alpha_k p_k,  r_{k+1} = r_k - alpha_k A p_k
        p_{k+1} = r_{k+1} + (<r_{k+1}, r_{k+1}> / <r_k, r_k>) p_k

    ``init`` warm-starts v (costs one extra product). Exact after dim(y) steps in exact arithmetic.

    A direction with <p, A p> <= 0 means A is not positive definite (a non-convex lower level,
    e.g. a neural network far from a strict minimum). ``negative_curvature="raise"`` stops with a
    ValueError; ``"truncate"`` stops as truncated CG does (Steihaug 1983; Nocedal and Wright,
    Numerical Optimization, 2nd ed. 2006, Algorithms 7.1 and 7.2), CG minimizing the model
    m(v) = 1/2 <v, A v> - <b, v>:

    * at iteration k >= 1 it returns v_k, the model's minimizer over the Krylov directions
      explored so far, all of which had positive curvature;
    * at iteration 0 (the first direction p_0 = r_0 = b - A v_0 already has <p_0, A p_0> <= 0)
      it returns ``b``. Cold (v_0 = 0, p_0 = b) this is the steepest-descent direction -grad m(0)
      with unit scale, as Nocedal-Wright Alg. 7.1 returns; Steihaug's Alg. 7.2 goes along p_0 = b
      to the trust-region boundary, which is b itself for the radius ||b||, the size of the
      solution when A is the identity. With no trust region this unit scaling is the choice made
      here: v = b solves the system with A replaced by I (curvature 1 along every direction;
      dividing by |<p_0, A p_0>| instead would blow up near zero curvature). Warm-started, the
      first direction is r_0, but no step along it is safe: v_0 + tau r_0 compounds across
      outer iterations, each warm-started from the last (for A = diag(1, -3), tau = 1 multiplies
      the negative-curvature component by 4 per call), and v_0 itself would freeze v forever.
      The warm start is then discarded and the cold answer b returned.

    Either way a RuntimeWarning is issued, once per run inside :func:`truncation_warnings`.

    ``host_sync`` chooses how the stopping and curvature tests are read. ``True``: into Python at
    every iteration, stopping at the first one that holds (fewest products). ``False``: as masks
    (``torch.where``) on the device, all ``steps`` products always computed, a finished or
    truncated iterate frozen by zero step sizes, and one read at the end (to raise or warn): no
    host synchronisation per iteration, the choice on an accelerator, where each read waits for
    the device. Both return the same v (bit for bit in float64 while no test fires; after a
    stop the masked loop's extra products are discarded but counted). ``None`` (default): per
    iteration when ``tol > 0`` or ``b`` lives on the CPU (where reading a scalar costs no
    synchronisation), masked otherwise.
    """
    _check_steps(steps)
    if negative_curvature not in NEGATIVE_CURVATURE:
        raise ValueError(f"negative_curvature must be one of {NEGATIVE_CURVATURE}, got {negative_curvature!r}")
    v = tree.zeros_like(b) if init is None else tree.clone(init)
    r = tree.clone(b) if init is None else tree.sub(b, matvec(v))
    p = tree.clone(r)
    rr = tree.sq_norm(r)
    eps = torch.finfo(rr.dtype).eps
    b_norm = rr.sqrt() if init is None else tree.norm(b)  # cold: r = b, so ||b|| = sqrt(rr) exactly
    threshold = (max(tol, eps) * b_norm) ** 2
    if host_sync is None:
        host_sync = tol > 0 or all(t.device.type == "cpu" for t in b.values())
    if not host_sync:
        return _masked_cg(matvec, b, v, r, p, rr, threshold, steps, negative_curvature)
    # The two tests read one number each into Python (``item``): the comparisons are those of
    # the tensors (a float32 or float64 value is exact as a Python float), one operation fewer
    # each than comparing on the tensor and reading the boolean.
    threshold = threshold.item()
    for k in range(steps):
        if rr.item() <= threshold:
            break
        ap = matvec(p)
        curvature = tree.dot(p, ap)
        if curvature.item() <= 0:
            _non_positive(curvature, k, negative_curvature, depth=2)
            if k == 0:
                v = tree.clone(b)
            break
        alpha = rr / curvature
        v = tree.axpy(alpha, p, v)
        r = tree.axpy(-alpha, ap, r)
        rr_new = tree.sq_norm(r)
        p = tree.axpy(rr_new / rr, p, r)
        rr = rr_new
    return v


def _non_positive(curvature, iteration: int, negative_curvature: str, depth: int) -> None:
    """Warn (truncate) or raise at non-positive curvature met at ``iteration``; ``depth``: frames
    between here and the caller of :func:`conjugate_gradient`, whom the warning names."""
    if negative_curvature == "truncate":
        _report_truncation(curvature, iteration, depth + 2)
        return
    raise ValueError(
        f"conjugate gradient met non-positive curvature <p, A p> = {float(curvature):.3e}: "
        "the lower-level Hessian is not positive definite at this point")


def _masked_cg(matvec, b, v, r, p, rr, threshold, steps, negative_curvature):
    """The CG loop of :func:`conjugate_gradient` without host reads: ``active`` is a 0-d bool
    tensor; once the residual test or a non-positive curvature switches it off, alpha = beta = 0
    freeze v. The first non-positive curvature and its iteration are kept as tensors and read
    once after the loop."""
    active = torch.ones((), dtype=torch.bool, device=rr.device)
    zero = torch.zeros((), dtype=rr.dtype, device=rr.device)
    first_bad = torch.full((), -1, dtype=torch.long, device=rr.device)
    bad_curvature = zero
    for k in range(steps):
        active = active & (rr > threshold)
        ap = matvec(p)
        curvature = tree.dot(p, ap)
        bad = active & (curvature <= 0)
        first_bad = torch.where(bad, k, first_bad)
        bad_curvature = torch.where(bad, curvature, bad_curvature)
        active = active & ~bad
        alpha = torch.where(active, rr / curvature, zero)
        v = tree.axpy(alpha, p, v)
        r = tree.axpy(-alpha, ap, r)
        rr_new = tree.sq_norm(r)
        p = tree.axpy(torch.where(active, rr_new / rr, zero), p, r)
        rr = torch.where(active, rr_new, rr)
    iteration = int(first_bad)  # the one host read
    if iteration >= 0:
        _non_positive(bad_curvature, iteration, negative_curvature, depth=3)
        if iteration == 0:
            v = tree.clone(b)
    return v


def neumann_series(matvec: Matvec, b: Tree, *, steps: int = 10, lr: float,
                   variant: str = "sum", generator: Optional[torch.Generator] = None,
                   term: Optional[int] = None) -> Tree:
    """Truncated Neumann series for A^{-1} b = lr * sum_{q>=0} (I - lr A)^q b.

    ``steps`` = Q >= 0 is the number of Hessian-vector products (at most Q for the random variants;
    Q = 0 gives v = lr b),
    the convention of the StocBiO paper (Ji et al. 2021, Algorithm 2: Q products, Q + 1 terms)
    and of benchopt's ``shia`` (``n_shia_steps`` products). With u_q = (I - lr A)^q b:

    ``variant="sum"`` (StocBiO): v = lr * sum_{q=0}^{Q} u_q, Q products, Q + 1 terms.

    ``variant="randomized"`` (Ghadimi and Wang 2018, Algorithm 3): q ~ Uniform{0, ..., Q},
    v = (Q + 1) * lr * u_q, q products; E_q v is the "sum" value for the same Q. Ghadimi-Wang's
    and benchopt's ``hia`` with N (``n_hia_steps``) terms draw q from {0, ..., N - 1}: that is
    ``steps = N - 1`` here.

    Convergence needs lr < 2/L, L the largest eigenvalue of the matrices the products use: the
    one shared batch Hessian, or every fresh batch Hessian, not only the mean Hessian (a batch
    Hessian's is larger: 1.9x to 2.4x the mean's on benchopt's quadratic, d = 100, batch 64).
    The truncation bias is (I - lr A)^{Q+1} A^{-1} b, so lr = 1/L gives a factor (1 - mu/L)^{Q+1}.

    The official code of BO-REP, SLIP, AccBO and AdamBO (the authors' public repositories)
    combines the u_q in other ways; they are offered to reproduce its curves, not
    as estimators of A^{-1} b, and Q is the code's own Q:
    ``"code_n1"`` lr * u_q with q ~ U{1..Q} (no Q factor; AccBO, TTSA, SUSTAIN code);
    ``"code_n2"`` lr * sum_{q=1}^{Q} u_q (no identity term; AccBO repo's StocBiO, VRBO);
    ``"code_n3"`` lr * u_Q + sum_{q=1}^{Q} u_q (sum not scaled by lr; SLIP repo's StocBiO, TTSA);
    ``"code_n4"`` lr * (u_Q + sum_{q=1}^{Q} u_q) (AdamBO repo). Each costs Q products (q for n1).

    ``term`` fixes the random q (see :func:`draw_neumann_term`: in 0..Q for "randomized", in
    0..Q-1 meaning q + 1 for "code_n1"), so one draw can be evaluated at two points; else q is
    drawn from ``generator``.
    """
    _check_steps(steps, minimum=0)
    if variant not in NEUMANN_VARIANTS:
        raise ValueError(f"neumann variant must be one of {NEUMANN_VARIANTS}, got {variant!r}")
    if variant not in ("sum", "randomized"):
        _check_steps(steps)  # the code's variants have no 0-product form

    def power(u: Tree, times: int) -> Tree:
        for _ in range(times):
            u = tree.axpy(-lr, matvec(u), u)
        return u

    if variant in RANDOMIZED_NEUMANN:
        q = draw_neumann_term(steps, generator, variant) if term is None else int(term)
        high = _term_bound(steps, variant)
        if not 0 <= q < high:
            raise ValueError(f"neumann term of variant {variant!r} must lie in [0, {high}), got {q}")
        if variant == "randomized":
            return tree.scale(power(tree.clone(b), q), (steps + 1) * lr)
        return tree.scale(power(tree.clone(b), q + 1), lr)
    # Running sums, not a list of terms: memory stays flat in Q. Same additions in the same order
    # as summing the list u_0, ..., u_Q left to right, so the values are unchanged bit for bit.
    u = tree.clone(b)
    total = u if variant == "sum" else None  # "sum": sum_{q=0}^{Q} u_q; else tail sum_{q=1}^{Q} u_q
    for _ in range(steps):
        product = matvec(u)
        # u_{q+1} = (I - lr A) u_q (tree.axpy's operations) and the running sum, in one pass
        # over the leaves: the loop runs once per product, its Python costs show on small problems.
        u = {k: t + -lr * product[k] for k, t in u.items()}
        total = u if total is None else {k: t + u[k] for k, t in total.items()}
    if variant == "sum":
        return tree.scale(total, lr)
    if variant == "code_n2":
        return tree.scale(total, lr)
    if variant == "code_n3":
        return tree.axpy(lr, u, total)
    return tree.scale(tree.add(u, total), lr)  # code_n4


def _term_bound(steps: int, variant: str) -> int:
    return steps + 1 if variant == "randomized" else steps


def draw_neumann_term(steps: int, generator: Optional[torch.Generator], variant: str = "randomized") -> int:
    """The random q of a randomized variant: Uniform{0, ..., steps} for "randomized",
    Uniform{0, ..., steps - 1} (meaning q + 1 products) for "code_n1"."""
    if variant not in RANDOMIZED_NEUMANN:
        raise ValueError(f"only the variants {RANDOMIZED_NEUMANN} draw a Neumann term, got {variant!r}")
    device = None if generator is None else generator.device  # draw where the generator lives
    return int(torch.randint(_term_bound(steps, variant), (1,), generator=generator, device=device))


def neumann_products(steps: int, variant: str, term: Optional[int] = None) -> int:
    """Number of Hessian-vector products :func:`neumann_series` makes (``term``: the drawn q of
    a randomized variant)."""
    if variant == "randomized":
        return int(term)
    if variant == "code_n1":
        return int(term) + 1
    return steps


def linear_sgd(matvec: Matvec, b: Tree, *, steps: int = 1, lr: float, init: Optional[Tree] = None,
               radius: Optional[float] = None, damping: float = 0.0, clip: Optional[float] = None) -> Tree:
    """(Stochastic) gradient descent on the quadratic  1/2 <v, (A + damping I) v> - <b, v>:

        d <- A z + damping z - b,     d_k <- d_k min(1, clip / ||d_k||) per tensor k (when clip)
        z <- Proj_{||z|| <= radius}( z - lr d )

    With ``init`` carried across outer iterations and one step per iteration this is the
    warm-started z of SOBA (Dagreou et al. 2022) and MA-SOBA (Chen et al. 2023); ``radius``
    enables MA-SOBA's projection. ``damping`` (lambda) and the per-tensor ``clip`` of the
    direction are BLISS's (arXiv:2510.06048, official code: 3 steps from a fresh z, lambda 1e-2,
    clip 1.0), which solves (A + lambda I) z = b. ``steps`` products.
    """
    _check_steps(steps, minimum=0)
    if not damping >= 0:
        raise ValueError(f"damping must be >= 0, got {damping!r}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be positive or None, got {clip!r}")
    z = tree.zeros_like(b) if init is None else tree.clone(init)
    for _ in range(steps):
        direction = tree.sub(matvec(z), b)
        if damping:
            direction = tree.axpy(damping, z, direction)
        if clip is not None:
            direction = clip_each(direction, clip)
        z = tree.axpy(-lr, direction, z)
        if radius is not None:
            z = project_ball(z, radius)
    return z


def project_ball(z: Tree, radius: float) -> Tree:
    """Euclidean projection of the whole tree onto {||z|| <= radius}: z min(1, radius / ||z||), the
    factor chosen with ``torch.where`` (no host read of the norm, so a solver step holding it can
    be vmapped or compiled)."""
    n = tree.norm(z)
    return tree.scale(z, torch.where(n > radius, radius / n, torch.ones_like(n)))


def _check_steps(steps: int, minimum: int = 1) -> None:
    if not isinstance(steps, int) or steps < minimum:
        raise ValueError(f"steps must be an integer >= {minimum}, got {steps!r}")

"""Tests of bilevel.hypergrad against closed forms, dense algebra and finite differences."""
import pytest
import torch

from bilevel import hypergrad
from bilevel.hypergrad import hypergradient
from bilevel.oracles import count_calls

DT = torch.float64
FD_STEP = 1e-5


def central_fd(fn, xf, step=FD_STEP):
    """Central finite differences of a scalar function of a flat vector."""
    g = torch.zeros_like(xf)
    for i in range(xf.numel()):
        e = torch.zeros_like(xf)
        e[i] = step
        g[i] = (fn(xf + e) - fn(xf - e)) / (2 * step)
    return g


def lower_L(problem, x, y, h):
    """Largest eigenvalue of d2_yy g at (x, y), from a dense Hessian."""
    Hyy, _ = h.dense_second_derivatives(problem, x, y)
    return float(torch.linalg.eigvalsh(Hyy).max())


@pytest.fixture(scope="module")
def logreg_solution(logreg, h):
    """x and y*(x) (Newton, gradient norm < 1e-12) for the logistic problem."""
    x, y0 = logreg.point()
    return x, h.newton_solve(logreg, x, y0)


@pytest.fixture(scope="module")
def logreg_phi(logreg, h):
    """Phi(x) = f(x, y*(x)) as a function of the flat x, y* by Newton."""
    newton_solve, split = h.newton_solve, h.split
    x0, y0 = logreg.point()
    xs = {k: tuple(v.shape) for k, v in x0.items()}

    def phi(xf):
        x = split(xf, xs)
        return float(logreg.upper_loss(x, newton_solve(logreg, x, y0, iters=12), None))
    return phi


# ---------------------------------------------------------------------------------------------
# The exact (dense) hypergradient.

def test_exact_equals_closed_form_at_solution(quad):
    x, y = quad.point()
    est = hypergradient(quad, x, y, None, None, method="exact")
    assert list(est) == ["u", "s"] and est["u"].shape == (3,) and est["s"].shape == (1,)
    expected = quad.true_hypergrad(quad.x_flat(x))
    assert torch.allclose(quad.x_flat(est), expected, rtol=0, atol=1e-10)


def test_exact_returns_v_solving_the_system(quad):
    """v = Ab^{-1} grad_y f = Ab^{-1} (y - tb)."""
    x, y = quad.point(at_solution=False)
    _, v = hypergrad.exact(quad, x, y, None, None)
    A, _, _, t = quad.mats()
    assert torch.allclose(quad.y_flat(v), torch.linalg.solve(A, quad.y_flat(y) - t), rtol=0, atol=1e-10)


def test_exact_uses_the_given_batches(quad):
    """On mini-batches: B x - Cb_lb Ab_lb^{-1} (y - tb_ub) with batch means."""
    x, y = quad.point(at_solution=False)
    lb, ub = torch.tensor([0, 4, 6]), torch.tensor([2, 2, 3])
    A, C, _, t = quad.mats(lb, ub)
    xf, yf = quad.x_flat(x), quad.y_flat(y)
    expected = quad.B @ xf - C @ torch.linalg.solve(A, yf - t)
    est = hypergradient(quad, x, y, ub, lb, method="exact")
    assert torch.allclose(quad.x_flat(est), expected, rtol=0, atol=1e-10)


def test_exact_matches_finite_differences_of_phi_quadratic(quad):
    x, y = quad.point()
    xf = quad.x_flat(x)
    fd = central_fd(lambda v: float(quad.phi(v)), xf)
    est = quad.x_flat(hypergradient(quad, x, y, None, None, method="exact"))
    assert float((est - fd).norm() / fd.norm()) < 1e-7


def test_exact_matches_finite_differences_of_phi_logreg(logreg, logreg_solution, logreg_phi, h):
    x, y = logreg_solution
    fd = central_fd(logreg_phi, h.cat(x))
    est = hypergradient(logreg, x, y, None, None, method="exact")
    assert h.rel(h.cat(est), fd) < 1e-6


def test_exact_singular_hessian_raises_value_error():
    from bilevel.problem import FunctionProblem
    p = FunctionProblem(lambda x, y, b: (y["w"] ** 2).sum(), lambda x, y, b: (x["l"] * y["w"]).sum(),
                        {"l": torch.ones(2, dtype=DT)}, {"w": torch.ones(2, dtype=DT)})
    x, y = p.init(None)
    with pytest.raises(ValueError, match="singular"):
        hypergradient(p, x, y, method="exact")


# ---------------------------------------------------------------------------------------------
# Iterative implicit methods against exact.

@pytest.mark.parametrize("hvp_mode", ["reverse", "forward"])
def test_cg_with_dim_steps_matches_exact(quad, logreg, logreg_solution, h, hvp_mode):
    for problem, (x, y) in ((quad, quad.point()), (logreg, logreg_solution)):
        ref = hypergradient(problem, x, y, None, None, method="exact")
        dim_y = sum(v.numel() for v in y.values())
        est = hypergradient(problem, x, y, None, None, method="cg", steps=dim_y + 2, hvp_mode=hvp_mode)
        assert h.rel(est, ref) < 1e-6


def test_cg_on_module_problem_matches_exact(mlp, h):
    x, y = mlp.point()  # not a lower solution: exact is the implicit formula at this y
    Hyy, _ = h.dense_second_derivatives(mlp, x, y)
    assert float(torch.linalg.eigvalsh(Hyy).min()) > 0  # CG needs an SPD Hessian here
    ref = hypergradient(mlp, x, y, None, None, method="exact")
    est = hypergradient(mlp, x, y, None, None, method="cg", steps=200, tol=1e-13)
    assert h.rel(est, ref) < 1e-6


@pytest.mark.parametrize("method", ["neumann", "linear_sgd", "fixed_point"])
def test_series_methods_converge_monotonically(quad, logreg, logreg_solution, h, method):
    for problem, (x, y) in ((quad, quad.point()), (logreg, logreg_solution)):
        ref = hypergradient(problem, x, y, None, None, method="exact")
        lr = 1.0 / lower_L(problem, x, y, h)
        errors = [h.rel(hypergradient(problem, x, y, None, None, method=method, steps=s, lr=lr), ref)
                  for s in (5, 20, 80, 320)]
        assert all(e2 <= e1 for e1, e2 in zip(errors, errors[1:])), errors
        assert errors[-1] < 1e-6 and errors[0] > 100 * errors[-1], errors


def test_neumann_randomized_mean_approaches_sum(quad, h):
    x, y = quad.point()
    lr, Q, n = 1.0 / quad.lipschitz(), 5, 400
    total = quad.x_flat(hypergradient(quad, x, y, None, None, method="neumann", steps=Q, lr=lr))
    draws = torch.stack([
        quad.x_flat(hypergradient(quad, x, y, None, None, method="neumann", steps=Q, lr=lr,
                                  variant="randomized", generator=torch.Generator().manual_seed(s)))
        for s in range(n)])
    spread = float(draws.std(0).norm())
    assert spread > 1e-3 * float(total.norm())  # the draws really differ
    stderr = (draws.var(0).sum() / n).sqrt()
    assert float((draws.mean(0) - total).norm()) < 5 * float(stderr)
    # each draw is one of the Q + 1 terms (Q + 1) lr (I - lr A)^q b, the hypergradient being affine in v
    A, C, _, t = quad.mats()
    b = quad.y_flat(y) - t
    terms = [quad.B @ quad.x_flat(x) - C @ ((Q + 1) * lr * torch.linalg.matrix_power(
        torch.eye(6, dtype=DT) - lr * A, q) @ b) for q in range(Q + 1)]
    for d in draws[:20]:
        assert min(float((d - tq).abs().max()) for tq in terms) < 1e-12


def test_away_from_solution_methods_match_exact_at_same_y(logreg, quad, h):
    """At y != y*(x) the estimators are the implicit formula at the current y, not grad Phi."""
    x, y = logreg.point()
    ystar = h.newton_solve(logreg, x, y)
    truth = hypergradient(logreg, x, ystar, None, None, method="exact")
    at_y = hypergradient(logreg, x, y, None, None, method="exact")
    assert h.rel(at_y, truth) > 1e-2
    lr = 1.0 / lower_L(logreg, x, y, h)
    cg = hypergradient(logreg, x, y, None, None, method="cg", steps=10)
    neu = hypergradient(logreg, x, y, None, None, method="neumann", steps=400, lr=lr)
    assert h.rel(cg, at_y) < 1e-8 and h.rel(neu, at_y) < 1e-6
    # quadratic: exact at y is B x - Cb Ab^{-1} (y - tb)
    xq, yq = quad.point(at_solution=False)
    est = hypergradient(quad, xq, yq, None, None, method="exact")
    expected = quad.implicit_at(quad.x_flat(xq), quad.y_flat(yq))
    assert torch.allclose(quad.x_flat(est), expected, rtol=0, atol=1e-10)
    assert h.rel(quad.x_flat(est), quad.true_hypergrad(quad.x_flat(xq))) > 1e-2


@pytest.mark.parametrize("steps", [1, 3, 12])
def test_fixed_point_default_map_equals_neumann_sum(quad, logreg, h, steps):
    """With T(x, y) = y - lr grad_y g and v_0 = 0:
        v_{k+1} = (d_y T)^T v_k + grad_y f = (I - lr H) v_k + b   =>  v_K = sum_{k<K} (I - lr H)^k b
    and (d_x T)^T v = -lr d2_xy g . v, so
        grad_x f + (d_x T)^T v_K = grad_x f - d2_xy g . (lr sum_{k<K} (I - lr H)^k b),
    which is the Neumann "sum" estimate with the same lr and K terms, i.e. K - 1 = steps products
    (H symmetric)."""
    for problem, (x, y) in ((quad, quad.point(at_solution=False)), (logreg, logreg.point())):
        lr = 0.8 / lower_L(problem, x, y, h)
        fp = hypergradient(problem, x, y, None, None, method="fixed_point", steps=steps + 1, lr=lr)
        neu = hypergradient(problem, x, y, None, None, method="neumann", steps=steps, lr=lr)
        h.assert_close(fp, neu, 1e-12, "fixed_point vs neumann")


def test_fixed_point_with_problem_lower_map(quad, h):
    """A problem-defined lower_map T = y - lr (Ab y + Cb^T x + ab) gives the default-map result."""
    lr = 0.5 / quad.lipschitz()

    class WithMap(type(quad)):
        def lower_map(self, x, y, batch):
            A, C, a, _ = self.mats(batch)
            yf = torch.cat([y["w"], y["b"]])
            xf = torch.cat([x["u"], x["s"]])
            return self.y_tree(yf - lr * (A @ yf + C.T @ xf + a))

    mapped = WithMap()
    x, y = quad.point(at_solution=False)
    with count_calls() as c:
        a = hypergradient(mapped, x, y, None, None, method="fixed_point", steps=15)  # no lr needed
    assert c["grad_lower"] == 0 and c["hvp"] == 15
    b = hypergradient(quad, x, y, None, None, method="fixed_point", steps=15, lr=lr)
    h.assert_close(a, b, 1e-12, "lower_map")


def test_fixed_point_tol_stops_early_and_lr_required(quad, h):
    x, y = quad.point()
    lr = 1.0 / quad.lipschitz()
    with count_calls() as c:
        est = hypergradient(quad, x, y, None, None, method="fixed_point", steps=1000, lr=lr, tol=1e-12)
    assert c["hvp"] < 1000 and c["cross"] == 1 and c["grad_upper"] == 1
    ref = hypergradient(quad, x, y, None, None, method="exact")
    assert h.rel(est, ref) < 1e-9
    with pytest.raises(ValueError, match="lr"):
        hypergradient(quad, x, y, None, None, method="fixed_point", steps=3)


def test_linear_sgd_and_cg_warm_start_at_solution(quad, h):
    """init = the exact v: linear_sgd stays there and CG returns it (the residual is ~0)."""
    x, y = quad.point()
    ref, v = hypergrad.exact(quad, x, y, None, None)
    est = hypergradient(quad, x, y, None, None, method="linear_sgd", steps=3, lr=0.1, init=v)
    assert h.rel(est, ref) < 1e-10
    est = hypergradient(quad, x, y, None, None, method="cg", steps=1, init=v)
    assert h.rel(est, ref) < 1e-10
    # and a bad warm start with 0 linear_sgd steps is used as is: grad_x f - d2_xy g . 0
    zero = {k: torch.zeros_like(t) for k, t in v.items()}
    est = hypergradient(quad, x, y, None, None, method="linear_sgd", steps=0, lr=0.1, init=zero)
    assert torch.allclose(quad.x_flat(est), quad.B @ quad.x_flat(x), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Iterative differentiation.

def unrolled(problem, x, y0, lr, K, h):
    """y_K by K explicit gradient steps (plain autograd)."""
    split = h.split
    ys = h.shapes_of(y0)
    yf = h.cat(y0)
    for _ in range(K):
        yf = yf - lr * h.grad_y_lower(problem, x, split(yf, ys))
    return split(yf, ys)


def test_itd_matches_finite_differences_of_unrolled_objective(logreg, h):
    x, y0 = logreg.point()
    lr, K = 0.5 / lower_L(logreg, x, y0, h), 10
    xs = h.shapes_of(x)

    def F(xf):
        xx = h.split(xf, xs)
        return float(logreg.upper_loss(xx, unrolled(logreg, xx, y0, lr, K, h), None))

    fd = central_fd(F, h.cat(x))
    est = hypergradient(logreg, x, y0, None, None, method="itd", steps=K, lr=lr)
    assert h.rel(h.cat(est), fd) < 1e-6
    # the returned y_K is the unrolled iterate
    g, yK = hypergrad.itd(logreg, x, y0, None, [None] * K, lr=lr)
    h.assert_close(yK, unrolled(logreg, x, y0, lr, K, h), 1e-12, "y_K")
    assert not any(t.requires_grad for t in list(g.values()) + list(yK.values()))


def test_itd_quadratic_closed_form_and_truncation(quad, h):
    """y_{k+1} = M y_k - lr (Cb^T x + ab), M = I - lr Ab. Differentiating only the last T steps
    (y_{K-T} held fixed):  d y_K / d x = -lr sum_{k<T} M^k Cb^T, and
        itd = B x + (d y_K / d x)^T (y_K - tb)."""
    x, y0 = quad.point(at_solution=False)
    xf, yf = quad.x_flat(x), quad.y_flat(y0)
    A, C, a, t = quad.mats()
    lr, K = 0.7 / quad.lipschitz(), 6
    M = torch.eye(6, dtype=DT) - lr * A
    yK = yf.clone()
    for _ in range(K):
        yK = M @ yK - lr * (C.T @ xf + a)
    results = {}
    for T in (0, 2, K):
        J = -lr * sum((torch.linalg.matrix_power(M, k) @ C.T for k in range(T)), torch.zeros(6, 4, dtype=DT))
        expected = quad.B @ xf + J.T @ (yK - t)
        with count_calls() as c:
            est = hypergradient(quad, x, y0, None, None, method="itd", steps=K, lr=lr, truncate=T)
        assert torch.allclose(quad.x_flat(est), expected, rtol=0, atol=1e-11), T
        assert dict(c) == {"grad_upper": 1, "grad_lower": K, "hvp": T, "cross": T}
        results[T] = est
    # truncate=0 is the direct term grad_x f(x, y_K) only
    assert torch.allclose(quad.x_flat(results[0]), quad.B @ xf, rtol=0, atol=1e-12)
    untruncated = hypergradient(quad, x, y0, None, None, method="itd", steps=K, lr=lr)
    h.assert_close(untruncated, results[K], 1e-14, "truncate=K")


def test_itd_truncate_zero_is_direct_gradient_logreg(logreg, h):
    x, y0 = logreg.point()
    lr, K = 0.5 / lower_L(logreg, x, y0, h), 5
    yK = unrolled(logreg, x, y0, lr, K, h)
    xl = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    direct = torch.autograd.grad(logreg.upper_loss(xl, yK, None), list(xl.values()))
    est = hypergradient(logreg, x, y0, None, None, method="itd", steps=K, lr=lr, truncate=0)
    h.assert_close(est, dict(zip(x, direct)), 1e-12, "itd truncate=0")


def test_itd_many_steps_approaches_exact(logreg, logreg_solution, h):
    x, ystar = logreg_solution
    x0, y0 = logreg.point()
    truth = hypergradient(logreg, x, ystar, None, None, method="exact")
    lr = 1.0 / lower_L(logreg, x, ystar, h)
    errors = [h.rel(hypergradient(logreg, x, y0, None, None, method="itd", steps=K, lr=lr), truth)
              for K in (5, 200)]
    assert errors[1] < 1e-6 and errors[0] > 1e-3, errors


def test_itd_invalid_truncate(quad):
    x, y = quad.point()
    for T in (-1, 4):
        with pytest.raises(ValueError):
            hypergradient(quad, x, y, None, None, method="itd", steps=3, lr=0.1, truncate=T)
    with pytest.raises(ValueError):
        hypergrad.itd(quad, x, y, None, [], lr=0.1)


# ---------------------------------------------------------------------------------------------
# The entry point: options and call counts.

def test_unknown_method_lists_valid_methods(quad):
    x, y = quad.point()
    with pytest.raises(ValueError) as info:
        hypergradient(quad, x, y, method="newton")
    for name in ("exact", "cg", "neumann", "linear_sgd", "itd", "fixed_point"):
        assert name in str(info.value)


def test_unknown_option_is_named(quad):
    x, y = quad.point()
    with pytest.raises(TypeError, match="stepz") as info:
        hypergradient(quad, x, y, method="cg", stepz=3)
    assert "tol" in str(info.value) and "hvp_mode" in str(info.value)  # the valid options are listed
    with pytest.raises(TypeError, match="truncate"):  # an option of another method
        hypergradient(quad, x, y, method="neumann", lr=0.1, truncate=2)


@pytest.mark.parametrize("method", ["neumann", "linear_sgd", "itd"])
def test_missing_lr_raises_type_error(quad, method):
    x, y = quad.point()
    with pytest.raises(TypeError, match="lr"):
        hypergradient(quad, x, y, method=method, steps=3)


def test_single_tensor_variables_accepted(h):
    """x and y given as plain tensors are wrapped as {"w": tensor}."""
    from bilevel.problem import FunctionProblem
    c = torch.tensor([1.0, 2.0], dtype=DT)
    # g = 1/2 ||y||^2 - <x, y>  => y* = x;  f = 1/2 ||y - c||^2  => grad Phi = x - c
    p = FunctionProblem(lambda x, y, b: 0.5 * ((y["w"] - c) ** 2).sum(),
                        lambda x, y, b: 0.5 * (y["w"] ** 2).sum() - (x["w"] * y["w"]).sum(),
                        torch.zeros(2, dtype=DT), torch.zeros(2, dtype=DT))
    x = torch.tensor([0.5, -1.0], dtype=DT)
    est = hypergradient(p, x, x.clone(), method="cg", steps=2)
    assert torch.allclose(est["w"], x - c, rtol=0, atol=1e-14)


@pytest.mark.parametrize("k", [1, 3, 6, 10])
def test_cg_call_counts(quad, k):
    x, y = quad.point()
    with count_calls() as c:
        hypergradient(quad, x, y, None, None, method="cg", steps=k)
    assert c["hvp"] <= k and c["cross"] == 1 and c["grad_upper"] == 1 and c["grad_lower"] == 0
    if k < 6:  # below dim(y) CG cannot have converged: it uses every product
        assert c["hvp"] == k


def test_neumann_and_linear_sgd_call_counts(quad):
    x, y = quad.point()
    with count_calls() as c:
        hypergradient(quad, x, y, None, None, method="neumann", steps=7, lr=0.1)
    assert dict(c) == {"grad_upper": 1, "grad_lower": 0, "hvp": 7, "cross": 1}  # steps = products
    with count_calls() as c:
        hypergradient(quad, x, y, None, None, method="linear_sgd", steps=7, lr=0.1)
    assert dict(c) == {"grad_upper": 1, "grad_lower": 0, "hvp": 7, "cross": 1}
    with count_calls() as c:
        hypergradient(quad, x, y, None, None, method="fixed_point", steps=7, lr=0.1)
    assert c["hvp"] == 7 and c["cross"] == 1 and c["grad_upper"] == 1


def test_method_options(quad):
    opts = hypergrad.method_options("neumann")
    assert set(opts) == {"lr", "steps", "variant", "generator", "hvp_mode"}
    assert opts["steps"] == 10 and opts["variant"] == "sum"
    with pytest.raises(ValueError):
        hypergrad.method_options("nope")


def test_resampled_hessian_batches_are_fresh_per_product_and_repeatable():
    """Neumann(resample=True): its draw holds Q batches drawn up front from the run's generator,
    the k-th product uses the k-th, so evaluating one draw twice gives the same estimate (what
    STORM-type corrections need); a shared-batch draw gives another estimate."""
    import torch

    from bilevel.estimators import Neumann
    from bilevel.hypergrad import PerProduct
    from bilevel.problem import FunctionProblem

    seen = []

    def lower(x, y, b):
        seen.append(int(b))
        return 0.5 * (1 + 0.1 * b) * (y["w"] ** 2).sum() + (x["l"] * y["w"]).sum()

    problem = FunctionProblem(lambda x, y, b: ((y["w"] - 1) ** 2).sum(), lower,
                              {"l": torch.ones(2, dtype=torch.float64)}, {"w": torch.zeros(2, dtype=torch.float64)},
                              sample=lambda level, g: torch.randint(1000, (), generator=g).double())
    x, y = problem.init(None)
    estimator = Neumann(lr=0.5, steps=4, variant="sum", resample=True)
    draw = estimator.draw(problem, torch.Generator().manual_seed(123))
    assert isinstance(draw.hessian, PerProduct) and len(draw.hessian) == 4
    seen.clear()
    first, _ = estimator(problem, x, y, None, draw)
    assert seen == [int(b) for b in draw.hessian] + [int(draw.cross)]  # products in order, then the cross product
    assert len(set(seen)) == 5
    second, _ = estimator(problem, x, y, None, draw)
    assert torch.equal(first["l"], second["l"])
    shared_draw = draw._replace(hessian=draw.hessian[0])
    shared, _ = Neumann(lr=0.5, steps=4, variant="sum", resample=False)(problem, x, y, None, shared_draw)
    assert not torch.equal(first["l"], shared["l"])

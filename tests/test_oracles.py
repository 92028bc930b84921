"""Tests of bilevel.oracles: gradients, second-order products, modes, call counting."""
import warnings

import pytest
import torch

from bilevel.oracles import count_calls, cross, grad_lower, grad_lower_y, grad_upper, hvp, hvp_and_cross
from bilevel.problem import BilevelProblem, FunctionProblem

DT = torch.float64


def random_like(t, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in t.items()}


@pytest.fixture
def jvp_calls(monkeypatch):
    """Count torch.func.jvp calls, to make sure "forward" mode really runs forward mode."""
    calls = []
    original = torch.func.jvp

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(torch.func, "jvp", counting)
    return calls


# ---------------------------------------------------------------------------------------------
# First-order oracles.

def _flat_grads(h, problem, which, x, y, batch=None):
    """(grad_x, grad_y) of upper/lower loss by torch.autograd.functional.jacobian on the flat z."""
    xs, ys = h.shapes_of(x), h.shapes_of(y)
    nx = sum(v.numel() for v in x.values())
    loss = problem.upper_loss if which == "upper" else problem.lower_loss

    def fn(z):
        return loss(h.split(z[:nx], xs), h.split(z[nx:], ys), batch)

    g = torch.autograd.functional.jacobian(fn, torch.cat([h.cat(x), h.cat(y)]))
    return g[:nx], g[nx:]


def test_gradients_match_autograd_on_concatenation(any_problem, h):
    problem, x, y = any_problem
    for which, oracle in (("upper", grad_upper), ("lower", grad_lower)):
        gx, gy = oracle(problem, x, y, None)
        ex, ey = _flat_grads(h, problem, which, x, y)
        assert list(gx) == list(x) and list(gy) == list(y)
        for k in x:
            assert gx[k].shape == x[k].shape
        assert torch.allclose(h.cat(gx), ex, rtol=0, atol=1e-12)
        assert torch.allclose(h.cat(gy), ey, rtol=0, atol=1e-12)
    gy_only = grad_lower_y(problem, x, y, None)
    assert torch.allclose(h.cat(gy_only), _flat_grads(h, problem, "lower", x, y)[1], rtol=0, atol=1e-12)


def test_quadratic_gradients_closed_form(quad, h):
    """grad_x g = Cb y, grad_y g = Ab y + Cb^T x + ab, grad_x f = B x, grad_y f = y - tb,
    with the means taken over the given batches."""
    x, y = quad.point(at_solution=False)
    xf, yf = quad.x_flat(x), quad.y_flat(y)
    lb, ub = torch.tensor([0, 2, 2]), torch.tensor([1, 4, 0])
    A, C, a, t = quad.mats(lb, ub)
    gx, gy = grad_lower(quad, x, y, lb)
    assert torch.allclose(quad.x_flat(gx), C @ yf, rtol=0, atol=1e-12)
    assert torch.allclose(quad.y_flat(gy), A @ yf + C.T @ xf + a, rtol=0, atol=1e-12)
    fx, fy = grad_upper(quad, x, y, ub)
    assert torch.allclose(quad.x_flat(fx), quad.B @ xf, rtol=0, atol=1e-12)
    assert torch.allclose(quad.y_flat(fy), yf - t, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Second-order oracles against dense derivatives.

@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_hvp_and_cross_match_dense_hessian(any_problem, h, mode):
    problem, x, y = any_problem
    Hyy, Hxy = h.dense_second_derivatives(problem, x, y)
    assert float(Hxy.abs().max()) > 1e-3  # the cross block is not trivially zero
    for seed in (0, 1):
        v = random_like(y, seed)
        hv = hvp(problem, x, y, v, None, mode=mode)
        cr = cross(problem, x, y, v, None, mode=mode)
        assert list(hv) == list(y) and list(cr) == list(x)
        assert torch.allclose(h.cat(hv), Hyy @ h.cat(v), rtol=0, atol=1e-11)
        assert torch.allclose(h.cat(cr), Hxy @ h.cat(v), rtol=0, atol=1e-11)
        for k in x:
            assert cr[k].shape == x[k].shape


def test_hvp_uses_the_batch(quad):
    """On a mini-batch the Hessian is the batch mean of the A_i (a repeated index counts twice)."""
    x, y = quad.point(at_solution=False)
    v = random_like(y, 4)
    batch = torch.tensor([3, 3, 5])
    A, C, _, _ = quad.mats(batch)
    for mode in ("reverse", "forward"):
        hv = hvp(quad, x, y, v, batch, mode=mode)
        cr = cross(quad, x, y, v, batch, mode=mode)
        assert torch.allclose(quad.y_flat(hv), A @ quad.y_flat(v), rtol=0, atol=1e-12)
        assert torch.allclose(quad.x_flat(cr), C @ quad.y_flat(v), rtol=0, atol=1e-12)
    # a different batch gives a different product
    other = hvp(quad, x, y, v, torch.tensor([0, 1, 2]))
    assert float((quad.y_flat(other) - A @ quad.y_flat(v)).abs().max()) > 1e-3


@pytest.mark.parametrize("name", ["quad", "logreg", "mlp"])
def test_forward_mode_equals_reverse_mode(request, name, jvp_calls):
    problem = request.getfixturevalue(name)
    x, y = problem.point(at_solution=False) if name == "quad" else problem.point()
    v = random_like(y, 11)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback warning: forward mode works here
        hf = hvp(problem, x, y, v, None, mode="forward")
        cf = cross(problem, x, y, v, None, mode="forward")
    assert len(jvp_calls) >= 2, "forward mode did not call torch.func.jvp"
    hr = hvp(problem, x, y, v, None, mode="reverse")
    cr = cross(problem, x, y, v, None, mode="reverse")
    for k in y:
        assert torch.allclose(hf[k], hr[k], rtol=0, atol=1e-10)
    for k in x:
        assert torch.allclose(cf[k], cr[k], rtol=0, atol=1e-10)


def test_hvp_and_cross_equals_separate_calls(any_problem):
    problem, x, y = any_problem
    v = random_like(y, 2)
    hv, cr, gy = hvp_and_cross(problem, x, y, v, None)
    hv2 = hvp(problem, x, y, v, None)
    cr2 = cross(problem, x, y, v, None)
    gy2 = grad_lower(problem, x, y, None)[1]
    for k in y:
        assert torch.allclose(hv[k], hv2[k], rtol=0, atol=1e-13)
        assert torch.allclose(gy[k], gy2[k], rtol=0, atol=1e-13)
        assert not gy[k].requires_grad
    for k in x:
        assert torch.allclose(cr[k], cr2[k], rtol=0, atol=1e-13)


def test_unknown_mode_raises(quad):
    x, y = quad.point()
    with pytest.raises(ValueError):
        hvp(quad, x, y, y, None, mode="sideways")
    with pytest.raises(ValueError):
        cross(quad, x, y, y, None, mode="sideways")


# ---------------------------------------------------------------------------------------------
# Call counting.

def test_count_calls_counts_exactly(quad):
    x, y = quad.point()
    v = random_like(y, 0)
    with count_calls() as c:
        hvp(quad, x, y, v, None)
    assert dict(c) == {"grad_upper": 0, "grad_lower": 0, "hvp": 1, "cross": 0}
    with count_calls() as c:
        cross(quad, x, y, v, None, mode="forward")
    assert dict(c) == {"grad_upper": 0, "grad_lower": 0, "hvp": 0, "cross": 1}
    with count_calls() as c:
        grad_upper(quad, x, y, None)
        grad_upper(quad, x, y, None)
        grad_lower(quad, x, y, None)
        grad_lower_y(quad, x, y, None)
    assert dict(c) == {"grad_upper": 2, "grad_lower": 2, "hvp": 0, "cross": 0}
    assert c.total == 4
    with count_calls() as c:
        hvp_and_cross(quad, x, y, v, None)
    assert dict(c) == {"grad_upper": 0, "grad_lower": 1, "hvp": 1, "cross": 1}


def test_count_calls_nested_contexts(quad):
    x, y = quad.point()
    v = random_like(y, 0)
    with count_calls() as outer:
        hvp(quad, x, y, v, None)
        with count_calls() as inner:
            hvp(quad, x, y, v, None)
            cross(quad, x, y, v, None)
        grad_upper(quad, x, y, None)
    assert dict(inner) == {"grad_upper": 0, "grad_lower": 0, "hvp": 1, "cross": 1}
    assert dict(outer) == {"grad_upper": 1, "grad_lower": 0, "hvp": 2, "cross": 1}
    diff = outer - inner
    assert dict(diff) == {"grad_upper": 1, "grad_lower": 0, "hvp": 1, "cross": 0}
    # outside every context nothing is recorded any more
    hvp(quad, x, y, v, None)
    assert outer["hvp"] == 2 and inner["hvp"] == 1


def test_count_calls_context_removed_after_exception(quad):
    x, y = quad.point()
    with pytest.raises(RuntimeError):
        with count_calls() as c:
            grad_upper(quad, x, y, None)
            raise RuntimeError("boom")
    grad_upper(quad, x, y, None)
    assert c["grad_upper"] == 1


# ---------------------------------------------------------------------------------------------
# Error handling and edge cases.

def _vector_problem():
    x0 = {"l": torch.ones(2, dtype=DT)}
    y0 = {"w": torch.ones(2, dtype=DT)}
    return FunctionProblem(
        upper_loss=lambda x, y, b: (y["w"] - x["l"]) ** 2,          # not a scalar
        lower_loss=lambda x, y, b: y["w"] ** 2 + x["l"] * y["w"],   # not a scalar
        x0=x0, y0=y0, name="vector_loss",
    )


@pytest.mark.parametrize("call", [
    lambda p, x, y: grad_upper(p, x, y, None),
    lambda p, x, y: grad_lower(p, x, y, None),
    lambda p, x, y: grad_lower_y(p, x, y, None),
    lambda p, x, y: hvp(p, x, y, y, None),
    lambda p, x, y: hvp(p, x, y, y, None, mode="forward"),
    lambda p, x, y: cross(p, x, y, y, None),
    lambda p, x, y: cross(p, x, y, y, None, mode="forward"),
    lambda p, x, y: hvp_and_cross(p, x, y, y, None),
])
def test_non_scalar_loss_raises_value_error(call):
    p = _vector_problem()
    x, y = p.init(None)
    with pytest.raises(ValueError, match="0-d"):
        call(p, x, y)


class _LinearInY(BilevelProblem):
    """g = <x_l, y_w> + 2 sum(y_b): linear in y, so d2_yy g = 0 and d2_xy g v = (v_w, 0)."""

    def lower_loss(self, x, y, batch):
        return (x["l"] * y["w"]).sum() + 2 * y["b"].sum() + 0 * x["m"].sum()

    def upper_loss(self, x, y, batch):
        return (y["w"] ** 2).sum()

    def init(self, generator):
        return ({"l": torch.ones(3, dtype=DT), "m": torch.ones(2, dtype=DT)},
                {"w": torch.ones(3, dtype=DT), "b": torch.ones(2, dtype=DT)})


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_lower_loss_linear_in_y_gives_zero_hvp(mode):
    p = _LinearInY()
    x, y = p.init(None)
    v = random_like(y, 3)
    hv = hvp(p, x, y, v, None, mode=mode)
    assert set(hv) == {"w", "b"}
    assert all(torch.equal(hv[k], torch.zeros_like(y[k])) for k in y)
    cr = cross(p, x, y, v, None, mode=mode)
    assert torch.allclose(cr["l"], v["w"], rtol=0, atol=1e-15)
    assert torch.equal(cr["m"], torch.zeros(2, dtype=DT))
    hv2, cr2, gy = hvp_and_cross(p, x, y, v, None)
    assert all(torch.equal(hv2[k], torch.zeros_like(y[k])) for k in y)
    assert torch.allclose(cr2["l"], v["w"], rtol=0, atol=1e-15)
    assert torch.allclose(gy["b"], torch.full((2,), 2.0, dtype=DT), rtol=0, atol=0)


def test_no_dependence_on_y_at_all_gives_zeros():
    """A lower loss that ignores y (degenerate, but must not crash): zero products."""
    p = FunctionProblem(lambda x, y, b: (x["l"] ** 2).sum(), lambda x, y, b: (x["l"] ** 2).sum(),
                        {"l": torch.ones(2, dtype=DT)}, {"w": torch.ones(2, dtype=DT)})
    x, y = p.init(None)
    hv = hvp(p, x, y, y, None)
    cr = cross(p, x, y, y, None)
    assert torch.equal(hv["w"], torch.zeros(2, dtype=DT))
    assert torch.equal(cr["l"], torch.zeros(2, dtype=DT))
    gx, gy = grad_upper(p, x, y, None)
    assert torch.equal(gy["w"], torch.zeros(2, dtype=DT))


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_inputs_unmodified_and_results_detached(quad, mode):
    x, y = quad.point(at_solution=False)
    v = random_like(y, 0)
    # callers' tensors may require grad (e.g. a differentiable outer loop)
    x = {k: t.clone().requires_grad_(True) for k, t in x.items()}
    y = {k: t.clone().requires_grad_(True) for k, t in y.items()}
    v = {k: t.clone().requires_grad_(True) for k, t in v.items()}
    snapshot = [{k: t.detach().clone() for k, t in d.items()} for d in (x, y, v)]
    results = []
    results += list(grad_upper(quad, x, y, None))
    results += list(grad_lower(quad, x, y, None))
    results.append(grad_lower_y(quad, x, y, None))
    results.append(hvp(quad, x, y, v, None, mode=mode))
    results.append(cross(quad, x, y, v, None, mode=mode))
    results += list(hvp_and_cross(quad, x, y, v, None))
    for r in results:
        for t in r.values():
            assert not t.requires_grad and t.grad_fn is None
    for d, s in zip((x, y, v), snapshot):
        for k in d:
            assert torch.equal(d[k].detach(), s[k])
            assert d[k].grad is None


# ---------------------------------------------------------------------------------------------
# Forward-mode fallback for operations without a forward-mode rule.

class CubeNoJvp(torch.autograd.Function):
    """t -> t^3, functorch-style (setup_context), with a backward made of differentiable ops
    (so double backward works) but no jvp: forward-mode AD is impossible."""

    @staticmethod
    def forward(t):
        return t ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        return grad * 3 * t ** 2


class CubeOldStyle(torch.autograd.Function):
    """The same function in the classic style (ctx in forward, no setup_context, no jvp)."""

    @staticmethod
    def forward(ctx, t):
        ctx.save_for_backward(t)
        return t ** 3

    @staticmethod
    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        return grad * 3 * t ** 2


def _cube_problem_class(function):
    """A fresh problem class each call: the fallback decision is cached per problem type."""

    class CubeProblem(BilevelProblem):
        # g = 1/3 <u, w^3> + <s, b^2> + 1/2 (||w||^2 + ||b||^2)
        def lower_loss(self, x, y, batch):
            return ((x["u"] * function.apply(y["w"])).sum() / 3 + (x["s"] * y["b"] ** 2).sum()
                    + 0.5 * ((y["w"] ** 2).sum() + (y["b"] ** 2).sum()))

        def upper_loss(self, x, y, batch):
            return ((y["w"] - 1) ** 2).sum() + (y["b"] ** 2).sum()

        def init(self, generator):
            g = torch.Generator().manual_seed(0)
            return ({"u": torch.rand(3, generator=g, dtype=DT) + 0.5, "s": torch.rand(2, generator=g, dtype=DT) + 0.5},
                    {"w": torch.randn(3, generator=g, dtype=DT), "b": torch.randn(2, generator=g, dtype=DT)})
    return CubeProblem


def _check_fallback(problem_cls, h):
    p = problem_cls()
    x, y = p.init(None)
    v = random_like(y, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf = hvp(p, x, y, v, None, mode="forward")
        cf = cross(p, x, y, v, None, mode="forward")
    assert any(issubclass(w.category, RuntimeWarning) for w in caught), [str(w.message) for w in caught]
    hr = hvp(p, x, y, v, None, mode="reverse")
    cr = cross(p, x, y, v, None, mode="reverse")
    for k in y:
        assert torch.allclose(hf[k], hr[k], rtol=0, atol=1e-10)
    for k in x:
        assert torch.allclose(cf[k], cr[k], rtol=0, atol=1e-10)
    # and both are right: d2_yy g = diag(2 u w + 1, 2 s + 1), d2_xy g . v = (w^2 v_w, 2 b v_b)
    assert torch.allclose(hr["w"], (2 * x["u"] * y["w"] + 1) * v["w"], rtol=0, atol=1e-12)
    assert torch.allclose(hr["b"], (2 * x["s"] + 1) * v["b"], rtol=0, atol=1e-12)
    assert torch.allclose(cr["u"], y["w"] ** 2 * v["w"], rtol=0, atol=1e-12)
    assert torch.allclose(cr["s"], 2 * y["b"] * v["b"], rtol=0, atol=1e-12)
    Hyy, Hxy = h.dense_second_derivatives(p, x, y)
    assert torch.allclose(h.cat(hf), Hyy @ h.cat(v), rtol=0, atol=1e-12)
    # later calls keep working (cached fallback), same values
    hf2 = hvp(p, x, y, v, None, mode="forward")
    assert all(torch.allclose(hf2[k], hr[k], rtol=0, atol=1e-10) for k in y)


def test_jvp_of_function_without_jvp_raises_not_implemented():
    """The premise of the fallback: torch.func.jvp through CubeNoJvp raises NotImplementedError
    (or a RuntimeError that mentions forward mode)."""
    y, v = torch.ones(2, dtype=DT), torch.ones(2, dtype=DT)
    with pytest.raises((NotImplementedError, RuntimeError)) as info:
        torch.func.jvp(lambda t: CubeNoJvp.apply(t), (y,), (v,))
    assert isinstance(info.value, NotImplementedError) or "forward" in str(info.value).lower()


def test_forward_mode_falls_back_for_function_without_jvp(h):
    _check_fallback(_cube_problem_class(CubeNoJvp), h)


def test_forward_mode_falls_back_for_classic_autograd_function(h):
    """A classic autograd.Function (no setup_context) works in reverse mode, so "forward"
    mode should fall back to reverse mode as for any other op without a forward rule."""
    _check_fallback(_cube_problem_class(CubeOldStyle), h)


def test_forward_mode_accepts_v_with_keys_in_another_order(quad):
    """Trees are matched by key everywhere (tree._check_keys ignores order); a v built with
    the keys in another order must give the same product in both modes."""
    x, y = quad.point(at_solution=False)
    v = random_like(y, 6)
    v_swapped = {"b": v["b"], "w": v["w"]}
    hr = hvp(quad, x, y, v_swapped, None, mode="reverse")
    hf = hvp(quad, x, y, v_swapped, None, mode="forward")
    for k in y:
        assert torch.allclose(hf[k], hr[k], rtol=0, atol=1e-10)

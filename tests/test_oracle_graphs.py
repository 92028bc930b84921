"""One lower-gradient graph per batch in implicit hypergradients, flat-memory Neumann sums and
host-sync-free CG: same values as the one-forward-per-product computation they replace.

The reference here is written by hand the way the oracles worked before: every Hessian-vector
product and the cross product rerun the lower loss and a create_graph gradient,

    hvp(v) = d/dy <grad_y g(x, y), v>,   cross(v) = d/dx <grad_y g(x, y), v>,

CG and the Neumann sum as textbook loops (the Neumann terms kept in a list). In float64 the
library must return the same bits.
"""
import warnings
import weakref

import pytest
import torch

from bilevel import linear_system, tree
from bilevel.hypergrad import PerProduct, hypergradient, implicit
from bilevel.oracles import count_calls

DT = torch.float64


# ---------------------------------------------------------------------------------------------
# The hand-written reference: a fresh graph for every product.

def _leaves(t):
    return {k: v.detach().requires_grad_(True) for k, v in t.items()}


def ref_upper(problem, x, y, batch):
    xl, yl = _leaves(x), _leaves(y)
    grads = torch.autograd.grad(problem.upper_loss(xl, yl, batch), [*xl.values(), *yl.values()],
                                allow_unused=True, materialize_grads=True)
    return dict(zip(x, grads[:len(x)])), dict(zip(y, grads[len(x):]))


def ref_product(problem, x, y, v, batch, wrt):
    xl, yl = _leaves(x), _leaves(y)
    loss = problem.lower_loss(xl, yl, batch)
    gy = torch.autograd.grad(loss, list(yl.values()), create_graph=True, allow_unused=True,
                             materialize_grads=True)
    gy = dict(zip(y, gy))
    keys = [k for k in y if gy[k].requires_grad]
    inputs = yl if wrt == "y" else xl
    out = torch.autograd.grad([gy[k] for k in keys], list(inputs.values()), grad_outputs=[v[k] for k in keys],
                              allow_unused=True, materialize_grads=True)
    return {k: t.detach() for k, t in zip(inputs, out)}


def ref_cg(matvec, b, steps):
    v, r, p = tree.zeros_like(b), tree.clone(b), tree.clone(b)
    rr = tree.sq_norm(r)
    threshold = (torch.finfo(rr.dtype).eps * tree.norm(b)) ** 2
    for _ in range(steps):
        if rr <= threshold:
            break
        ap = matvec(p)
        alpha = rr / tree.dot(p, ap)
        v = tree.axpy(alpha, p, v)
        r = tree.axpy(-alpha, ap, r)
        rr_new = tree.sq_norm(r)
        p = tree.axpy(rr_new / rr, p, r)
        rr = rr_new
    return v


def ref_neumann(matvec, b, steps, lr):
    terms = [tree.clone(b)]
    for _ in range(steps):
        terms.append(tree.axpy(-lr, matvec(terms[-1]), terms[-1]))
    total = terms[0]
    for t in terms[1:]:
        total = tree.add(total, t)
    return tree.scale(total, lr)


def ref_implicit(problem, x, y, upper, hessian_batches, cross_batch, solve):
    gx, gy = ref_upper(problem, x, y, upper)
    used = iter(hessian_batches)
    v = solve(lambda u: ref_product(problem, x, y, u, next(used), "y"), gy)
    return tree.sub(gx, ref_product(problem, x, y, v, cross_batch, "x"))


def assert_same_bits(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())


class CountingProblem:
    """Delegates to a problem and counts lower-loss evaluations per batch object."""

    def __init__(self, problem):
        self.problem, self.lower_calls = problem, []

    def upper_loss(self, x, y, batch):
        return self.problem.upper_loss(x, y, batch)

    def lower_loss(self, x, y, batch):
        self.lower_calls.append(batch)
        return self.problem.lower_loss(x, y, batch)


# ---------------------------------------------------------------------------------------------
# Same bits as the fresh-graph reference.

@pytest.mark.parametrize("name", ["quad", "logreg", "mlp"])
@pytest.mark.parametrize("steps", [3, 5, 10])
def test_cg_hypergradient_matches_fresh_graph_reference_bit_for_bit(name, steps, request):
    problem = request.getfixturevalue(name)
    x, y = problem.point()
    got = hypergradient(problem, x, y, None, None, method="cg", steps=steps)
    want = ref_implicit(problem, x, y, None, [None] * steps, None, lambda mv, b: ref_cg(mv, b, steps))
    assert_same_bits(got, want)


@pytest.mark.parametrize("name", ["quad", "logreg", "mlp"])
@pytest.mark.parametrize("steps", [0, 5, 10])
def test_neumann_hypergradient_matches_fresh_graph_reference_bit_for_bit(name, steps, request):
    problem = request.getfixturevalue(name)
    x, y = problem.point()
    got = hypergradient(problem, x, y, None, None, method="neumann", steps=steps, lr=0.05)
    want = ref_implicit(problem, x, y, None, [None] * steps, None, lambda mv, b: ref_neumann(mv, b, steps, 0.05))
    assert_same_bits(got, want)


@pytest.mark.parametrize("share", [False, True])
def test_per_product_batches_match_reference_bit_for_bit(quad, share):
    x, y = quad.point()
    g = torch.Generator().manual_seed(0)
    steps = 6
    hessian = PerProduct(quad.sample("lower", g) for _ in range(steps))
    cross = hessian[0] if share else quad.sample("lower", g)
    upper = quad.sample("upper", g)
    got, _ = implicit(quad, x, y, upper, hessian, cross,
                      lambda mv, b: linear_system.neumann_series(mv, b, steps=steps, lr=0.05))
    want = ref_implicit(quad, x, y, upper, list(hessian), cross, lambda mv, b: ref_neumann(mv, b, steps, 0.05))
    assert_same_bits(got, want)


# ---------------------------------------------------------------------------------------------
# One lower forward per batch; counts unchanged.

def test_shared_batch_evaluates_the_lower_loss_once(quad):
    """CG-10 on one batch: 10 HVPs and the cross product from one lower forward (11 before)."""
    x, y = quad.point()
    counting = CountingProblem(quad)
    batch = torch.tensor([0, 2, 4])
    with count_calls() as c:
        implicit(counting, x, y, None, batch, batch, lambda mv, b: linear_system.conjugate_gradient(mv, b, steps=5))
    assert dict(c) == {"grad_upper": 1, "grad_lower": 0, "hvp": 5, "cross": 1}
    assert len(counting.lower_calls) == 1


def test_separate_cross_batch_gets_its_own_single_forward(quad):
    x, y = quad.point()
    counting = CountingProblem(quad)
    hess, cross = torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5])
    implicit(counting, x, y, None, hess, cross, lambda mv, b: linear_system.conjugate_gradient(mv, b, steps=5))
    assert [b is hess for b in counting.lower_calls].count(True) == 1
    assert [b is cross for b in counting.lower_calls].count(True) == 1 and len(counting.lower_calls) == 2


@pytest.mark.parametrize("share", [False, True])
def test_per_product_batches_evaluate_each_batch_once(quad, share):
    x, y = quad.point()
    counting = CountingProblem(quad)
    g = torch.Generator().manual_seed(1)
    hessian = PerProduct(quad.sample("lower", g) for _ in range(4))
    cross = hessian[0] if share else quad.sample("lower", g)
    with count_calls() as c:
        implicit(counting, x, y, None, hessian, cross,
                 lambda mv, b: linear_system.neumann_series(mv, b, steps=4, lr=0.05))
    assert dict(c) == {"grad_upper": 1, "grad_lower": 0, "hvp": 4, "cross": 1}
    assert len(counting.lower_calls) == (4 if share else 5)
    for batch in [*hessian, cross]:
        assert sum(b is batch for b in counting.lower_calls) == 1


# ---------------------------------------------------------------------------------------------
# Neumann memory flat in the number of products.

@pytest.mark.parametrize("variant", ["sum", "code_n2", "code_n3", "code_n4"])
def test_neumann_keeps_a_bounded_number_of_terms_alive(variant):
    """At every product, count how many earlier product inputs u_q are still alive: a list of
    terms keeps all of them (q at product q), a running sum at most the current one."""
    A = torch.diag(torch.linspace(1.0, 2.0, 5, dtype=DT))
    seen, alive = [], []

    def matvec(u):
        alive.append(sum(ref() is not None for ref in seen))
        seen.append(weakref.ref(u["v"]))
        return {"v": A @ u["v"]}

    linear_system.neumann_series(matvec, {"v": torch.ones(5, dtype=DT)}, steps=30, lr=0.3, variant=variant)
    assert len(alive) == 30 and max(alive) <= 1, alive


@pytest.mark.parametrize("variant", ["sum", "code_n2", "code_n3", "code_n4"])
def test_neumann_running_sum_matches_term_list(variant):
    A = torch.diag(torch.linspace(1.0, 2.0, 5, dtype=DT))
    b = {"v": torch.linspace(-1.0, 1.0, 5, dtype=DT)}
    lr, q = 0.3, 7
    terms = [b["v"].clone()]
    for _ in range(q):
        terms.append(terms[-1] + -lr * (A @ terms[-1]))
    tail = terms[1]
    for t in terms[2:]:
        tail = tail + t
    total = terms[0]
    for t in terms[1:]:
        total = total + t  # left to right, u_0 first
    want = {"sum": total * lr, "code_n2": tail * lr,
            "code_n3": tail + lr * terms[-1], "code_n4": (terms[-1] + tail) * lr}[variant]
    got = linear_system.neumann_series(lambda u: {"v": A @ u["v"]}, b, steps=q, lr=lr, variant=variant)
    assert torch.equal(got["v"], want)


# ---------------------------------------------------------------------------------------------
# CG without host reads per iteration: same answers, same truncation behaviour.

def _spd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=DT)
    return m @ m.T + 0.5 * torch.eye(n, dtype=DT)


@pytest.mark.parametrize("steps", [3, 8, 20])  # 8, 20 >= dim: converges, then the mask freezes v
def test_masked_cg_equals_per_iteration_cg(steps):
    A = _spd(8)
    b = {"a": torch.linspace(-1, 1, 5, dtype=DT), "b": torch.linspace(0, 2, 3, dtype=DT)}

    def matvec(u):
        out = A @ torch.cat([u["a"], u["b"]])
        return {"a": out[:5], "b": out[5:]}

    synced = linear_system.conjugate_gradient(matvec, b, steps=steps, host_sync=True)
    masked = linear_system.conjugate_gradient(matvec, b, steps=steps, host_sync=False)
    if steps == 3:
        assert_same_bits(masked, synced)
    else:
        for k in b:
            torch.testing.assert_close(masked[k], synced[k], rtol=0, atol=1e-12)
    assert not torch.equal(synced["a"], b["a"])


def test_masked_cg_reads_no_scalar_inside_the_loop():
    """Tensor.__bool__ / item are host reads; the masked loop calls neither per iteration."""
    A = _spd(6)

    def matvec(u):
        return {"v": A @ u["v"]}

    b = {"v": torch.ones(6, dtype=DT)}
    original_bool, original_item = torch.Tensor.__bool__, torch.Tensor.item
    counted = []

    def counting_bool(self):
        counted.append(1)
        return original_bool(self)

    def counting_item(self):
        counted.append(1)
        return original_item(self)

    torch.Tensor.__bool__, torch.Tensor.item = counting_bool, counting_item
    try:
        linear_system.conjugate_gradient(matvec, b, steps=5, host_sync=False)
        masked_reads = len(counted)
        counted.clear()
        linear_system.conjugate_gradient(matvec, b, steps=5, host_sync=True)
        synced_reads = len(counted)
    finally:
        torch.Tensor.__bool__, torch.Tensor.item = original_bool, original_item
    assert masked_reads == 0 and synced_reads >= 5


@pytest.mark.parametrize("diag, at", [((-1.0, -2.0, -3.0), 0), ((1.0, 2.0, -3.0), 1)])
@pytest.mark.parametrize("host_sync", [True, False])
def test_masked_cg_keeps_truncation_semantics(diag, at, host_sync):
    A = torch.diag(torch.tensor(diag, dtype=DT))
    b = {"v": torch.tensor([1.0, 1.0, 0.5], dtype=DT)}  # <b, A b> = 2.25 > 0 for the indefinite A
    mv = lambda u: {"v": A @ u["v"]}  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = linear_system.conjugate_gradient(mv, b, steps=3, negative_curvature="truncate", host_sync=host_sync)
    messages = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert len(messages) == 1 and f"(iteration {at})" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = linear_system.conjugate_gradient(mv, b, steps=3, negative_curvature="truncate", host_sync=True)
    assert_same_bits(got, want)
    if at == 0:
        assert_same_bits(got, b)
    with pytest.raises(ValueError, match="non-positive curvature"):
        linear_system.conjugate_gradient(mv, b, steps=3, host_sync=host_sync)


def test_products_with_leaves_outside_the_gradient_graph_are_zero_there():
    """g = 1/2 ||a||^2 + <x_1, a> + 3 sum(b): grad_b g is constant and grad_a g = a + x_1 does not
    involve b or x_2, so d2_yy g . v = (v_a, 0) and d2_xy g . v = (v_a, 0)."""
    from bilevel.oracles import LowerProducts
    from bilevel.problem import FunctionProblem

    problem = FunctionProblem(
        upper_loss=lambda x, y, b: (y["a"] ** 2).sum(),
        lower_loss=lambda x, y, b: 0.5 * (y["a"] ** 2).sum() + x["x1"] @ y["a"] + 3 * y["b"].sum(),
        x0={"x1": torch.ones(2, dtype=DT), "x2": torch.ones(3, dtype=DT)},
        y0={"a": torch.ones(2, dtype=DT), "b": torch.ones(4, dtype=DT)})
    x, y = problem.init(None)
    v = {"a": torch.tensor([2.0, -1.0], dtype=DT), "b": torch.arange(4, dtype=DT)}
    products = LowerProducts(problem, x, y, None)
    for _ in range(2):  # the second call takes the remembered sparse path
        hv, cr = products.hvp(v), products.cross(v)
        assert_same_bits(hv, {"a": v["a"], "b": torch.zeros(4, dtype=DT)})
        assert_same_bits(cr, {"x1": v["a"], "x2": torch.zeros(3, dtype=DT)})

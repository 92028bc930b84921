"""Tests of bilevel.linear_system against dense linear algebra."""
import pytest
import torch

from bilevel import linear_system as ls

DT = torch.float64
SHAPES = {"w": (4,), "b": (2,)}


def to_tree(vec):
    return {"w": vec[:4].clone(), "b": vec[4:].clone()}


def to_vec(t):
    return torch.cat([t["w"], t["b"]])


class Matvec:
    """u -> A u on trees, counting products."""

    def __init__(self, A):
        self.A, self.calls = A, 0

    def __call__(self, u):
        self.calls += 1
        return to_tree(self.A @ to_vec(u))


@pytest.fixture
def system():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, 6, generator=g, dtype=DT)
    A = M @ M.T / 6 + 0.5 * torch.eye(6, dtype=DT)
    b = torch.randn(6, generator=g, dtype=DT)
    L = float(torch.linalg.eigvalsh(A).max())
    return A, b, L


def dense_neumann_term(A, b, lr, q):
    """(I - lr A)^q b by a dense matrix power."""
    return torch.linalg.matrix_power(torch.eye(A.shape[0], dtype=DT) - lr * A, q) @ b


# ---------------------------------------------------------------------------------------------
# Conjugate gradient.

def test_cg_solves_spd_system_in_n_steps(system):
    A, b, _ = system
    mv = Matvec(A)
    v = ls.conjugate_gradient(mv, to_tree(b), steps=6)
    assert set(v) == {"w", "b"} and v["w"].shape == (4,) and v["b"].shape == (2,)
    exact = torch.linalg.solve(A, b)
    assert float((to_vec(v) - exact).norm() / exact.norm()) < 1e-10
    assert float((A @ to_vec(v) - b).norm() / b.norm()) < 1e-10
    assert mv.calls <= 6


def test_cg_fewer_steps_is_inexact_and_uses_exactly_that_many_products(system):
    A, b, _ = system
    mv = Matvec(A)
    v = ls.conjugate_gradient(mv, to_tree(b), steps=2)
    exact = torch.linalg.solve(A, b)
    assert mv.calls == 2
    assert float((to_vec(v) - exact).norm() / exact.norm()) > 1e-4
    # residual decreases with steps (CG minimizes the A-norm error over growing Krylov spaces)
    errs = []
    for k in range(1, 7):
        e = to_vec(ls.conjugate_gradient(Matvec(A), to_tree(b), steps=k)) - exact
        errs.append(float(e @ A @ e))
    assert all(e2 <= e1 * (1 + 1e-12) for e1, e2 in zip(errs, errs[1:])), errs


def test_cg_one_step_is_steepest_descent(system):
    """v_1 = (<b, b> / <b, A b>) b."""
    A, b, _ = system
    v = ls.conjugate_gradient(Matvec(A), to_tree(b), steps=1)
    assert torch.allclose(to_vec(v), (b @ b) / (b @ A @ b) * b, rtol=0, atol=1e-14)


def test_cg_warm_start_at_solution_returns_it_immediately():
    """With an integer system A v = b holding exactly, the initial residual is exactly zero:
    only the warm-start product is spent and v comes back unchanged."""
    A = torch.diag(torch.tensor([1.0, 2.0, 4.0, 8.0, 3.0, 5.0], dtype=DT))
    A[0, 1] = A[1, 0] = 0.5
    v_true = torch.tensor([1.0, -2.0, 0.5, 0.25, 3.0, -1.0], dtype=DT)
    b = A @ v_true
    mv = Matvec(A)
    v = ls.conjugate_gradient(mv, to_tree(b), steps=6, init=to_tree(v_true))
    assert mv.calls == 1
    assert torch.equal(to_vec(v), v_true)


def test_cg_warm_start_near_solution_with_tol(system):
    A, b, _ = system
    exact = torch.linalg.solve(A, b)
    mv = Matvec(A)
    v = ls.conjugate_gradient(mv, to_tree(b), steps=6, init=to_tree(exact), tol=1e-8)
    assert mv.calls == 1
    assert torch.allclose(to_vec(v), exact, rtol=0, atol=1e-13)
    # the warm start does not alias the caller's tensor
    init = to_tree(exact)
    out = ls.conjugate_gradient(Matvec(A), to_tree(b), steps=3, init=init, tol=1e-8)
    out["w"].add_(1.0)
    assert torch.equal(to_vec(init), exact)


def test_cg_warm_start_from_elsewhere_converges(system):
    A, b, _ = system
    init = to_tree(torch.ones(6, dtype=DT))
    mv = Matvec(A)
    v = ls.conjugate_gradient(mv, to_tree(b), steps=6, init=init)
    assert mv.calls == 7  # one for the initial residual
    exact = torch.linalg.solve(A, b)
    assert float((to_vec(v) - exact).norm() / exact.norm()) < 1e-10


def test_cg_tol_stops_early(system):
    A, b, _ = system
    mv = Matvec(A)
    v = ls.conjugate_gradient(mv, to_tree(b), steps=50, tol=1e-3)
    assert mv.calls <= 6
    assert float((A @ to_vec(v) - b).norm()) <= 1e-3 * float(b.norm())


def test_cg_zero_rhs_returns_zero_without_products(system):
    A, _, _ = system
    mv = Matvec(A)
    v = ls.conjugate_gradient(mv, to_tree(torch.zeros(6, dtype=DT)), steps=5)
    assert mv.calls == 0 and torch.equal(to_vec(v), torch.zeros(6, dtype=DT))


@pytest.mark.parametrize("A", [
    -torch.eye(6, dtype=DT),                                        # negative definite
    torch.zeros(6, 6, dtype=DT),                                    # zero curvature
    torch.diag(torch.tensor([1.0, -3.0, 1.0, 1.0, 1.0, 1.0], dtype=DT)),  # indefinite
])
def test_cg_non_positive_curvature_raises(A):
    b = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=DT)
    with pytest.raises(ValueError, match="curvature"):
        ls.conjugate_gradient(Matvec(A), to_tree(b), steps=6)


def test_cg_truncate_returns_the_iterate_before_negative_curvature():
    # A = diag(2, 1, -1): b = (1, 1, 1). The first direction p0 = b has <p0, A p0> = 2 > 0, so
    # v1 = (<b, b> / <b, A b>) b = 1.5 b; the second direction has negative curvature here
    # (r1 = b - 1.5 A b = (-2, -0.5, 2.5), p1 = r1 + (||r1||^2/||b||^2) p0, <p1, A p1> < 0).
    A = torch.diag(torch.tensor([2.0, 1.0, -1.0], dtype=DT))
    b = torch.ones(3, dtype=DT)
    r1 = b - 1.5 * (A @ b)
    p1 = r1 + (r1 @ r1) / (b @ b) * b
    assert p1 @ A @ p1 < 0  # the premise of the test
    mv = Matvec(A)
    with pytest.warns(RuntimeWarning, match="iteration 1"):
        v = ls.conjugate_gradient(mv, to_tree(b), steps=3, negative_curvature="truncate")
    torch.testing.assert_close(to_vec(v), 1.5 * b)
    assert mv.calls == 2
    with pytest.raises(ValueError, match="curvature"):
        ls.conjugate_gradient(Matvec(A), to_tree(b), steps=3)
    with pytest.raises(ValueError, match="negative_curvature must be one of"):
        ls.conjugate_gradient(Matvec(A), to_tree(b), steps=3, negative_curvature="ignore")


class Plain:
    """u -> A u on plain tensors (one-leaf trees), counting products."""

    def __init__(self, A):
        self.A, self.calls = A, 0

    def __call__(self, u):
        self.calls += 1
        return {"v": self.A @ u["v"]}


INDEFINITE = torch.diag(torch.tensor([1.0, -3.0], dtype=DT))   # the example
ONES = {"v": torch.ones(2, dtype=DT)}


def truncated_cg(A, b, init=None, steps=5):
    with pytest.warns(RuntimeWarning, match="truncated at non-positive curvature"):
        return ls.conjugate_gradient(Plain(A), b, steps=steps, init=init, negative_curvature="truncate")


def test_cg_truncate_at_first_direction_returns_b_not_zero():
    """A = diag(1, -3), b = (1, 1): p_0 = b has <b, A b> = -2. Steihaug / Nocedal-Wright Alg. 7.1
    return the first (steepest-descent) direction b; the old code returned v_0 = 0, silently
    dropping the implicit term of the hypergradient."""
    mv = Plain(INDEFINITE)
    with pytest.warns(RuntimeWarning, match=r"iteration 0.*right-hand side b"):
        v = ls.conjugate_gradient(mv, ONES, steps=5, negative_curvature="truncate")
    torch.testing.assert_close(v["v"], ONES["v"], rtol=0, atol=0)
    assert mv.calls == 1


def test_cg_truncate_warm_start_at_first_direction_returns_b_and_does_not_freeze():
    """Warm start v_0 = (5, -7): r_0 = b - A v_0 = (-4, -20) has <r_0, A r_0> = 16 - 1200 < 0.
    The old code returned v_0 = (5, -7) on every call (v frozen); v_0 + r_0 = (1, -27) would grow
    4x per call along the negative-curvature axis. The warm start is discarded: b, every call."""
    v0 = {"v": torch.tensor([5.0, -7.0], dtype=DT)}
    r0 = ONES["v"] - INDEFINITE @ v0["v"]
    assert r0 @ INDEFINITE @ r0 < 0  # the premise
    v = v0
    for _ in range(4):  # each call warm-started from the previous answer, as the estimator does
        v = truncated_cg(INDEFINITE, ONES, init=v)
        torch.testing.assert_close(v["v"], ONES["v"], rtol=0, atol=0)


def test_cg_truncate_warm_start_keeps_positive_curvature_progress():
    """Truncation after k >= 1 steps keeps v_k, warm start included: from v_0 = (0, 0, 1) on
    A = diag(2, 1, -1), b = (1, 1, 0) the first residual r_0 = (1, 1, 1) is the cold example above,
    so v_1 = v_0 + 1.5 r_0 is returned."""
    A = torch.diag(torch.tensor([2.0, 1.0, -1.0], dtype=DT))
    v0 = {"v": torch.tensor([0.0, 0.0, 1.0], dtype=DT)}
    b = {"v": torch.tensor([1.0, 1.0, 0.0], dtype=DT)}
    r0 = b["v"] - A @ v0["v"]
    torch.testing.assert_close(r0, torch.ones(3, dtype=DT))
    v = truncated_cg(A, b, init=v0)
    torch.testing.assert_close(v["v"], v0["v"] + 1.5 * r0)


def test_cg_truncation_warns_once_per_run_scope():
    """Inside one truncation_warnings() scope (one solve() call) only the first truncation warns;
    all are counted; a new scope warns again; outside any scope every truncation warns."""
    import warnings

    def truncations(n):
        for _ in range(n):
            ls.conjugate_gradient(Plain(INDEFINITE), ONES, steps=3, negative_curvature="truncate")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ls.truncation_warnings() as log:
            truncations(3)
        assert len(caught) == 1 and log.count == 3
        assert "once per run" in str(caught[0].message)
        with ls.truncation_warnings() as second:
            truncations(2)
        assert len(caught) == 2 and second.count == 2 and log.count == 3
        truncations(2)
        assert len(caught) == 4
        with ls.truncation_warnings() as quiet:  # positive definite: nothing to report
            ls.conjugate_gradient(Plain(torch.eye(2, dtype=DT)), ONES, steps=3, negative_curvature="truncate")
        assert len(caught) == 4 and quiet.count == 0


def test_cg_truncate_on_positive_definite_systems_changes_nothing(system):
    A, b, _ = system
    strict = ls.conjugate_gradient(Matvec(A), to_tree(b), steps=6)
    lenient = ls.conjugate_gradient(Matvec(A), to_tree(b), steps=6, negative_curvature="truncate")
    assert torch.equal(to_vec(strict), to_vec(lenient))


# ---------------------------------------------------------------------------------------------
# Neumann series.

@pytest.mark.parametrize("Q", [1, 2, 5, 17])
def test_neumann_sum_matches_dense_powers(system, Q):
    A, b, L = system
    lr = 0.9 / L
    mv = Matvec(A)
    v = ls.neumann_series(mv, to_tree(b), steps=Q, lr=lr, variant="sum")
    expected = lr * sum(dense_neumann_term(A, b, lr, q) for q in range(Q + 1))  # Q products, Q + 1 terms
    assert torch.allclose(to_vec(v), expected, rtol=0, atol=1e-12)
    assert mv.calls == Q


def test_neumann_sum_converges_to_solution(system):
    A, b, L = system
    v = ls.neumann_series(Matvec(A), to_tree(b), steps=400, lr=1.0 / L)
    exact = torch.linalg.solve(A, b)
    assert float((to_vec(v) - exact).norm() / exact.norm()) < 1e-8


@pytest.mark.parametrize("q", [0, 1, 4, 5])
def test_neumann_randomized_fixed_term(system, q):
    A, b, L = system
    lr, Q = 0.5 / L, 5
    mv = Matvec(A)
    v = ls.neumann_series(mv, to_tree(b), steps=Q, lr=lr, variant="randomized", term=q)
    assert torch.allclose(to_vec(v), (Q + 1) * lr * dense_neumann_term(A, b, lr, q), rtol=0, atol=1e-12)
    assert mv.calls == q


def test_neumann_randomized_average_over_terms_is_the_sum(system):
    """E_q[(Q + 1) lr (I - lr A)^q b] over q uniform in {0..Q} is the truncated sum of the same Q
    products (unbiased)."""
    A, b, L = system
    lr, Q = 0.7 / L, 6
    draws = [to_vec(ls.neumann_series(Matvec(A), to_tree(b), steps=Q, lr=lr, variant="randomized", term=q))
             for q in range(Q + 1)]
    total = to_vec(ls.neumann_series(Matvec(A), to_tree(b), steps=Q, lr=lr, variant="sum"))
    assert torch.allclose(torch.stack(draws).mean(0), total, rtol=0, atol=1e-12)


def test_neumann_randomized_draws_from_generator(system):
    A, b, L = system
    lr, Q = 0.5 / L, 4
    candidates = [(Q + 1) * lr * dense_neumann_term(A, b, lr, q) for q in range(Q + 1)]
    seen = set()
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        v = to_vec(ls.neumann_series(Matvec(A), to_tree(b), steps=Q, lr=lr, variant="randomized", generator=g))
        matches = [q for q, c in enumerate(candidates) if torch.allclose(v, c, rtol=0, atol=1e-12)]
        assert len(matches) == 1
        seen.add(matches[0])
        # same seed, same draw
        g2 = torch.Generator().manual_seed(seed)
        v2 = to_vec(ls.neumann_series(Matvec(A), to_tree(b), steps=Q, lr=lr, variant="randomized", generator=g2))
        assert torch.equal(v, v2)
    assert seen == set(range(Q + 1))


def test_neumann_invalid_arguments(system):
    A, b, _ = system
    with pytest.raises(ValueError):
        ls.neumann_series(Matvec(A), to_tree(b), steps=3, lr=0.1, variant="product")
    for term in (-1, 4):
        with pytest.raises(ValueError):
            ls.neumann_series(Matvec(A), to_tree(b), steps=3, lr=0.1, variant="randomized", term=term)
    for term in (-1, 3):
        with pytest.raises(ValueError):
            ls.neumann_series(Matvec(A), to_tree(b), steps=3, lr=0.1, variant="code_n1", term=term)
    for steps in (-1, -2, 2.5, "3"):
        with pytest.raises(ValueError):
            ls.neumann_series(Matvec(A), to_tree(b), steps=steps, lr=0.1)


# ---------------------------------------------------------------------------------------------
# Linear SGD and projection.

def test_linear_sgd_one_step_hand_formula(system):
    A, b, L = system
    lr = 0.3
    z0 = torch.linspace(-1, 1, 6, dtype=DT)
    mv = Matvec(A)
    z = ls.linear_sgd(mv, to_tree(b), steps=1, lr=lr, init=to_tree(z0))
    assert torch.allclose(to_vec(z), z0 - lr * (A @ z0 - b), rtol=0, atol=1e-14)
    assert mv.calls == 1
    # from zero: z_1 = lr b
    z = ls.linear_sgd(Matvec(A), to_tree(b), steps=1, lr=lr)
    assert torch.allclose(to_vec(z), lr * b, rtol=0, atol=1e-15)


def test_linear_sgd_k_steps_from_zero_equals_neumann_sum(system):
    """z_{k+1} = (I - lr A) z_k + lr b, z_0 = 0  =>  z_K = lr sum_{q<K} (I - lr A)^q b."""
    A, b, L = system
    lr, K = 0.8 / L, 7
    z = ls.linear_sgd(Matvec(A), to_tree(b), steps=K, lr=lr)
    expected = lr * sum(dense_neumann_term(A, b, lr, q) for q in range(K))
    assert torch.allclose(to_vec(z), expected, rtol=0, atol=1e-12)


def test_linear_sgd_steps_zero_returns_init(system):
    A, b, _ = system
    mv = Matvec(A)
    z0 = torch.arange(6, dtype=DT)
    z = ls.linear_sgd(mv, to_tree(b), steps=0, lr=0.1, init=to_tree(z0))
    assert mv.calls == 0 and torch.equal(to_vec(z), z0)
    z = ls.linear_sgd(mv, to_tree(b), steps=0, lr=0.1)
    assert torch.equal(to_vec(z), torch.zeros(6, dtype=DT))
    for steps in (-1, 1.0, None):
        with pytest.raises(ValueError):
            ls.linear_sgd(mv, to_tree(b), steps=steps, lr=0.1)


def test_linear_sgd_projection_radius(system):
    A, b, L = system
    radius = 0.05
    lr = 0.5 / L
    z = to_tree(torch.zeros(6, dtype=DT))
    for _ in range(5):
        z_next = ls.linear_sgd(Matvec(A), to_tree(b), steps=1, lr=lr, init=z, radius=radius)
        # hand formula: step, then project onto the ball
        step = to_vec(z) - lr * (A @ to_vec(z) - b)
        n = float(step.norm())
        expected = step * (radius / n) if n > radius else step
        assert torch.allclose(to_vec(z_next), expected, rtol=0, atol=1e-14)
        assert float(to_vec(z_next).norm()) <= radius * (1 + 1e-12)
        z = z_next
    # the unprojected iterate leaves the ball, so the projection was active
    free = ls.linear_sgd(Matvec(A), to_tree(b), steps=5, lr=lr)
    assert float(to_vec(free).norm()) > radius


def test_project_ball():
    z = to_tree(torch.tensor([3.0, 0.0, 0.0, 0.0, 4.0, 0.0], dtype=DT))  # norm 5, across keys
    p = ls.project_ball(z, 1.0)
    assert torch.allclose(to_vec(p), torch.tensor([0.6, 0, 0, 0, 0.8, 0], dtype=DT), rtol=0, atol=1e-15)
    inside = ls.project_ball(z, 10.0)
    assert torch.equal(to_vec(inside), to_vec(z))


def test_cg_invalid_steps(system):
    A, b, _ = system
    for steps in (0, -1, 1.5):
        with pytest.raises(ValueError):
            ls.conjugate_gradient(Matvec(A), to_tree(b), steps=steps)


def test_official_code_neumann_variants_match_their_formulas():
    """The Neumann combinations in the official SLIP, AccBO and AdamBO repositories (the "code_n*"
    variants of bilevel.linear_system.neumann_series), with u_q = (I - lr A)^q b and Q = steps:
    N1 lr u_q (q in 1..Q), N2 lr sum_{1..Q} u_q, N3 lr u_Q + sum_{1..Q} u_q, N4 lr (u_Q + sum_{1..Q} u_q)."""
    g = torch.Generator().manual_seed(11)
    m = torch.randn(4, 4, generator=g, dtype=DT)
    a = m @ m.T / 4 + torch.eye(4, dtype=DT)
    b = {"v": torch.randn(4, generator=g, dtype=DT)}
    lr, steps = 0.3, 5
    step = torch.eye(4, dtype=DT) - lr * a
    u = [torch.linalg.matrix_power(step, q) @ b["v"] for q in range(steps + 1)]
    tail = sum(u[1:])
    expected = {"code_n2": lr * tail, "code_n3": lr * u[steps] + tail, "code_n4": lr * (u[steps] + tail)}
    matvec = lambda w: {"v": a @ w["v"]}  # noqa: E731
    for variant, value in expected.items():
        got = ls.neumann_series(matvec, b, steps=steps, lr=lr, variant=variant)
        torch.testing.assert_close(got["v"], value, rtol=1e-12, atol=1e-12)
    for term in range(steps):  # code_n1: term t means q = t + 1
        got = ls.neumann_series(matvec, b, steps=steps, lr=lr, variant="code_n1", term=term)
        torch.testing.assert_close(got["v"], lr * u[term + 1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="variant"):
        ls.neumann_series(matvec, b, steps=steps, lr=lr, variant="code_n5")


def test_code_n1_takes_its_term_from_the_draw():
    """Through the solvers' estimator, code_n1's q is drawn into the Draw (from the run's
    generator), so evaluating one draw twice is reproducible, like "randomized"."""
    from bilevel.estimators import Neumann
    from bilevel.problem import FunctionProblem
    problem = FunctionProblem(lambda x, y, b: ((y["w"] - 1) ** 2).sum(),
                              lambda x, y, b: 0.5 * (y["w"] ** 2).sum() * 2 + (x["l"] * y["w"]).sum(),
                              {"l": torch.ones(2, dtype=DT)}, {"w": torch.zeros(2, dtype=DT)})
    x, y = problem.init(None)
    estimator = Neumann(lr=0.2, steps=4, variant="code_n1")
    draw = estimator.draw(problem, torch.Generator().manual_seed(5))
    assert 0 <= draw.term < 4 and len(draw.hessian) == draw.term + 1  # q + 1 products
    first, _ = estimator(problem, x, y, None, draw)
    second, _ = estimator(problem, x, y, None, draw)
    assert torch.equal(first["l"], second["l"])

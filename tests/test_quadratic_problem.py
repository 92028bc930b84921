"""Tests of the benchopt quadratic bilevel problem (problems/quadratic.py)."""
import numpy as np
import pytest
import torch

from bilevel import tree
from bilevel.hypergrad import exact
from bilevel.problems.quadratic import Quadratic

SMALL = dict(n_samples_inner=50, n_samples_outer=40, dim_inner=5, dim_outer=3, batch_size=8)
# Distinct constants so that a mix-up in which L goes where changes the numbers.
LS = dict(L_inner_inner=2.0, L_inner_outer=3.0, L_cross_inner=0.5, L_outer_inner=4.0,
          L_outer_outer=5.0, L_cross_outer=0.7, mu_inner=0.2)


@pytest.fixture(scope="module")
def problem():
    return Quadratic(**SMALL)


def point(problem, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(problem.dim_outer, generator=g, dtype=torch.float64)
    z = torch.randn(problem.dim_inner, generator=g, dtype=torch.float64)
    return {"x": x}, {"z": z}


def dense_q(A, B, C, a, b, x, z):
    return 0.5 * z @ A @ z + 0.5 * x @ B @ x + x @ C @ z + a @ z + b @ x


def rebuild_sample0(seed, n, d_in, d_out, L_in, L_out, L_cross, mu):
    """Independent numpy rebuild of sample 0's dense (A, B, C, a, b), following the draw order."""
    rs = np.random.RandomState(seed)
    u1 = np.linalg.svd(rs.randn(d_in, 1))[0]
    r1 = u1 @ np.diag(np.logspace(np.log10(mu) / 2, np.log10(L_in) / 2, d_in)) @ u1.T
    row = rs.randn(n, 1, d_in)[0] @ r1
    A = row.T @ row
    u2 = np.linalg.svd(rs.randn(d_out, 1))[0]
    r2 = u2 @ np.diag(np.r_[0, np.logspace(np.log10(mu) / 2, np.log10(L_out) / 2, d_out - 1)]) @ u2.T
    row = rs.randn(n, 1, d_out)[0] @ r2
    B = row.T @ row
    u3, _, vh3 = np.linalg.svd(rs.randn(d_out, d_in))
    d3 = np.zeros((d_out, d_in))
    k = min(d_in, d_out)
    d3[:k, :k] = np.diag(np.logspace(np.log10(mu), np.log10(L_cross), k))
    w = rs.randn(n, 1, d_in)[0]
    C = (u3 @ d3 @ w.T) @ (w @ vh3.T)
    a, b = rs.randn(n, d_in)[0], rs.randn(n, d_out)[0]
    return [torch.from_numpy(np.asarray(t)) for t in (A, B, C, a, b)]


# -- 1. generator ------------------------------------------------------------------------------

def test_mean_hessians_structure(problem):
    A = problem.lower_mean.A
    assert torch.equal(A, A.T)
    assert torch.linalg.eigvalsh(A)[0] > 0
    # B_i = s_i s_i^T with s_i orthogonal to a fixed direction: Hbar is exactly singular.
    assert abs(float(torch.linalg.eigvalsh(problem.upper_mean.B)[0])) < 1e-12


def test_mean_spectra_for_large_n():
    big = Quadratic(n_samples_inner=4000, n_samples_outer=4000, dim_inner=5, dim_outer=5, mu_inner=0.1,
                    L_inner_inner=1.0, L_cross_inner=1.0)
    expected = np.logspace(-1, 0, 5)
    assert np.allclose(torch.linalg.eigvalsh(big.lower_mean.A).numpy(), expected, rtol=0.15)
    singular = torch.linalg.svdvals(big.lower_mean.C).numpy()[::-1]
    assert np.allclose(singular, expected, rtol=0.25)


def test_per_sample_losses_are_rank_one_quadratics(problem):
    x, y = point(problem)
    for level, samples in (("lower", problem.lower_samples), ("upper", problem.upper_samples)):
        loss = getattr(problem, f"{level}_loss")
        for i in (0, 7, 33):
            r, s, p, q, a, b = (t[i] for t in samples)
            A, B, C = torch.outer(r, r), torch.outer(s, s), torch.outer(p, q)
            assert int(torch.linalg.matrix_rank(A)) == 1 and int(torch.linalg.matrix_rank(C)) == 1
            expected = dense_q(A, B, C, a, b, x["x"], y["z"])
            assert torch.allclose(loss(x, y, torch.tensor([i])), expected, rtol=1e-12, atol=1e-12)


def test_determinism():
    one, two, other = Quadratic(**SMALL), Quadratic(**SMALL), Quadratic(**SMALL, seed=7)
    for t1, t2, t3 in zip(one.lower_samples + one.upper_samples, two.lower_samples + two.upper_samples,
                          other.lower_samples + other.upper_samples):
        assert torch.equal(t1, t2)
        assert not torch.allclose(t1, t3)


def test_matches_independent_numpy_rebuild():
    pb = Quadratic(**SMALL, **LS, seed=123)
    inner_seed, outer_seed = np.random.RandomState(123).randint(2**31 - 1, size=2)
    assert pb.trials == 1 and pb.seeds == (inner_seed, outer_seed)
    n_in, n_out, d_in, d_out = (SMALL[k] for k in ("n_samples_inner", "n_samples_outer", "dim_inner", "dim_outer"))
    lower = rebuild_sample0(inner_seed, n_in, d_in, d_out, LS["L_inner_inner"], LS["L_inner_outer"],
                            LS["L_cross_inner"], LS["mu_inner"])
    upper = rebuild_sample0(outer_seed, n_out, d_in, d_out, LS["L_outer_inner"], LS["L_outer_outer"],
                            LS["L_cross_outer"], LS["mu_inner"])
    assert torch.allclose(pb.lower_samples.a[0], lower[3]) and torch.allclose(pb.upper_samples.b[0], upper[4])
    x, y = point(pb, seed=3)
    for loss, mats in ((pb.lower_loss, lower), (pb.upper_loss, upper)):
        assert torch.allclose(loss(x, y, torch.tensor([0])), dense_q(*mats, x["x"], y["z"]), rtol=1e-10)


def test_acceptance_retries_then_raises(problem, monkeypatch):
    lo, up = problem.lower_mean, problem.upper_mean
    jac = -np.linalg.solve(lo.A.numpy(), lo.C.numpy().T)
    kj = up.C.numpy() @ jac
    proxy = jac.T @ up.A.numpy() @ jac + up.B.numpy() + (kj + kj.T) / 2
    assert np.linalg.eigvalsh(proxy)[0] >= 1e-12
    import bilevel.problems.quadratic as module
    outcomes = iter([-1.0, 1.0])  # the first draw is rejected, the second accepted
    monkeypatch.setattr(module, "value_hessian_min_eig", lambda *args: next(outcomes))
    retried = Quadratic(**SMALL)
    rng = np.random.RandomState(2442)
    rng.randint(2**31 - 1, size=2)
    assert retried.trials == 2 and retried.seeds == tuple(rng.randint(2**31 - 1, size=2))
    monkeypatch.setattr(module, "value_hessian_min_eig", lambda *a: -1.0)
    with pytest.raises(ValueError, match="20"):
        Quadratic(**SMALL)


# -- 2. mini-batch losses ------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["lower", "upper"])
def test_batch_losses_are_sample_means(problem, level):
    x, y = point(problem, seed=1)
    loss = getattr(problem, f"{level}_loss")
    idx = torch.tensor([3, 7, 7, 0, 12, 39])
    singles = torch.stack([loss(x, y, idx[k:k + 1]) for k in range(len(idx))])
    assert abs(float(loss(x, y, idx) - singles.mean())) < 1e-10
    n = (problem.lower_samples if level == "lower" else problem.upper_samples).r.shape[0]
    assert abs(float(loss(x, y, None) - loss(x, y, torch.arange(n)))) < 1e-10


def test_sample_indices():
    problem = Quadratic(**SMALL, **LS, sampling="replacement")  # blocks: tests/test_sampling_blocks.py
    g = torch.Generator().manual_seed(0)
    lower = torch.cat([problem.sample("lower", g) for _ in range(200)])
    upper = torch.cat([problem.sample("upper", g) for _ in range(200)])
    assert problem.sample("lower", g).shape == (SMALL["batch_size"],) and lower.dtype == torch.long
    assert lower.min() >= 0 and lower.max() == SMALL["n_samples_inner"] - 1
    assert upper.min() >= 0 and upper.max() == SMALL["n_samples_outer"] - 1
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(problem.sample("upper", a), problem.sample("upper", b))


def test_init_and_float32():
    pb = Quadratic(**SMALL, dtype="float32")
    x0, y0 = pb.init(torch.Generator())
    assert torch.equal(x0["x"], torch.full((3,), -2.0)) and torch.equal(y0["z"], torch.zeros(5))
    assert x0["x"].dtype == torch.float32 and pb.init(torch.Generator())[0]["x"] is not x0["x"]
    g = torch.Generator().manual_seed(0)
    assert pb.lower_loss(x0, y0, pb.sample("lower", g)).dtype == torch.float32
    assert pb.upper_loss(x0, y0, None).dtype == torch.float32


# -- 3. closed form ------------------------------------------------------------------------------

def test_y_star_is_lower_stationary(problem):
    x, _ = point(problem, seed=2)
    z = problem.y_star(x)["z"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(problem.lower_loss(x, {"z": z}, None), [z])
    assert float(grad.norm()) < 1e-10


def test_hypergradient_matches_finite_differences_and_exact(problem):
    x, _ = point(problem, seed=4)
    closed = problem.hypergradient_closed_form(x)
    eps, fd = 1e-5, torch.zeros(problem.dim_outer, dtype=torch.float64)
    for k in range(problem.dim_outer):
        e = torch.zeros_like(fd)
        e[k] = eps
        fd[k] = (problem.value({"x": x["x"] + e}) - problem.value({"x": x["x"] - e})) / (2 * eps)
    assert tree.relative_error(closed, {"x": fd}) < 1e-6
    reference = exact(problem, x, problem.y_star(x), None, None)[0]
    assert tree.relative_error(closed, reference) < 1e-8


# -- 4. evaluate ---------------------------------------------------------------------------------

def test_evaluate(problem):
    x, y = point(problem, seed=5)
    x_copy, y_copy = tree.clone(x), tree.clone(y)
    metrics = problem.evaluate(x, y)
    assert set(metrics) >= {"grad_norm_sq", "inner_distance", "value"}
    assert all(isinstance(v, float) for v in metrics.values())
    gap = y["z"] - problem.y_star(x)["z"]
    assert metrics["inner_distance"] == pytest.approx(float(gap @ gap), rel=1e-12)
    assert torch.equal(x["x"], x_copy["x"]) and torch.equal(y["z"], y_copy["z"])
    assert problem.evaluate(x, problem.y_star(x))["inner_distance"] < 1e-20
    grad = problem.hypergradient_closed_form(x)["x"]
    assert metrics["grad_norm_sq"] == pytest.approx(float(grad @ grad), rel=1e-12)
    assert metrics["value"] == pytest.approx(float(problem.value(x)), rel=1e-12)


# -- 5. validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [("dtype", "float16"), ("dim_inner", 0), ("n_samples_outer", -3),
                                           ("batch_size", 2.5), ("mu_inner", 0.0)])
def test_bad_options_raise(option, value):
    with pytest.raises(ValueError, match=option):
        Quadratic(**{**SMALL, option: value})


def test_too_few_inner_samples_raise():
    with pytest.raises(ValueError, match="n_samples_inner"):
        Quadratic(n_samples_inner=4, dim_inner=5)


def test_bad_level_raises(problem):
    with pytest.raises(ValueError):
        problem.sample("middle", torch.Generator())


# -- 6. registry ---------------------------------------------------------------------------------

def test_registry():
    from bilevel.registry import PROBLEMS
    import bilevel.problems.quadratic  # noqa: F401  registers the class
    pb = PROBLEMS.create("quadratic", dim_inner=5, dim_outer=3, n_samples_inner=50, n_samples_outer=40)
    assert isinstance(pb, Quadratic) and pb.name == "quadratic"
    with pytest.raises(TypeError):
        PROBLEMS.create("quadratic", dim_inr=5)

"""The one estimator layer: every method of bilevel.hypergradient is one object of
bilevel.estimators (METHODS), checked against the dense solve and closed forms, its options
checked at construction, and ``hvp_mode`` reaching the products from ``solve`` and the CLI."""
import dataclasses

import pytest
import torch

from bilevel import estimators, hypergrad, oracles, solve, tree
from bilevel.estimators import (ITD, METHODS, ConjugateGradient, Draw, Exact, FixedPoint, LinearSystemSGD,
                                Neumann)
from bilevel.hypergrad import hypergradient

DT = torch.float64

#: Options with which each method converges on the test quadratic (dim y = 6); "lr" is replaced
#: by 1/L of the batch Hessian, and 400 iterations truncate below 1e-9.
CONVERGED = {
    "exact": {}, "cg": {"steps": 12}, "neumann": {"lr": None, "steps": 400},
    "linear_sgd": {"lr": None, "steps": 400}, "fixed_point": {"lr": None, "steps": 400},
}


def draws(problem, estimator, batch):
    """The draw of a fixed lower batch (every product and the cross product on it)."""
    return estimator.given(None, batch)


@pytest.mark.parametrize("method", sorted(CONVERGED))
def test_each_object_matches_the_dense_solve(quad, h, method):
    """Each estimator object, called through the protocol on a draw, against the dense d2_yy g
    and d2_xy g of the conftest helpers (not through hypergrad.exact), on a batch and at a y
    away from y*."""
    x, y = quad.point()
    y = {k: v + 0.1 for k, v in y.items()}
    batch = torch.tensor([0, 2, 5])
    Hyy, Hxy = _dense(quad, x, y, batch)
    gx_f, gy_f = oracles.grad_upper(quad, x, y, None)
    expected = tree.flatten(gx_f) - Hxy @ torch.linalg.solve(Hyy, tree.flatten(gy_f))
    options = dict(CONVERGED[method])
    if "lr" in options:  # 1/L of this batch's Hessian
        options["lr"] = 1.0 / float(torch.linalg.eigvalsh(Hyy)[-1])
    estimator = METHODS[method](**options, **({"resample": False} if method == "neumann" else {}))
    h_est, _ = estimator(quad, x, y, estimator.init(x, y), draws(quad, estimator, batch))
    assert torch.allclose(tree.flatten(h_est), expected, rtol=0, atol=1e-9), method


def _dense(problem, x, y, batch):
    """Dense d2_yy g and d2_xy g (dim x by dim y) on ``batch`` by torch.autograd.functional."""
    xf, yf = tree.flatten(x), tree.flatten(y)

    def g(xv, yv):
        return problem.lower_loss(tree.unflatten(xv, x), tree.unflatten(yv, y), batch)
    H = torch.autograd.functional.hessian(g, (xf, yf))
    return H[1][1], H[0][1]


def test_itd_object_matches_the_unrolled_closed_form(quad):
    """ITD through its object: K unrolled steps on the mean quadratic,
    h = B x + J^T (y_K - t), J = -lr sum_k (I - lr A)^k C^T."""
    x, y0 = quad.point(at_solution=False)
    lr, K = 0.2, 5
    A, C, a = quad.mats()[:3]
    xf, yk = quad.x_flat(x), quad.y_flat(y0)
    for _ in range(K):
        yk = yk - lr * (A @ yk + C.T @ xf + a)
    M = torch.eye(6, dtype=DT) - lr * A
    J = -lr * sum((torch.linalg.matrix_power(M, k) @ C.T for k in range(K)), torch.zeros(6, 4, dtype=DT))
    t = quad.t_j.mean(0)
    estimator = ITD(lr=lr, steps=K)
    h_est, state = estimator(quad, x, y0, estimator.init(x, y0), estimator.given(None, None))
    assert state is None
    assert torch.allclose(quad.x_flat(h_est), quad.B @ xf + J.T @ (yk - t), rtol=0, atol=1e-11)


def test_conjugate_gradient_object_matches_finite_differences(quad):
    """At y = y*(x) the CG object's estimate is grad Phi: central differences of the closed-form
    Phi(x) = f(x, y*(x)) (step 1e-5, error O(step^2))."""
    x, y = quad.point()
    xf = quad.x_flat(x)
    fd = torch.zeros_like(xf)
    for i in range(xf.numel()):
        e = torch.zeros_like(xf)
        e[i] = 1e-5
        fd[i] = (quad.phi(xf + e) - quad.phi(xf - e)) / 2e-5
    estimator = ConjugateGradient(steps=6)
    h_est, v = estimator(quad, x, y, estimator.init(x, y), estimator.given(None, None))
    assert torch.allclose(quad.x_flat(h_est), fd, rtol=0, atol=1e-8)
    assert set(v) == set(y)  # the state is v, a dict of tensors shaped like y


def test_exact_takes_the_cross_product_on_the_cross_batch(quad):
    """Exact with distinct Hessian and cross batches: d2_yy g on the first, d2_xy g on the second."""
    x, y = quad.point()
    hb, cb = torch.tensor([0, 1, 2]), torch.tensor([4, 5, 6])
    Hyy, _ = _dense(quad, x, y, hb)
    _, Hxy = _dense(quad, x, y, cb)
    gx_f, gy_f = oracles.grad_upper(quad, x, y, None)
    expected = tree.flatten(gx_f) - Hxy @ torch.linalg.solve(Hyy, tree.flatten(gy_f))
    h_est, _ = Exact()(quad, x, y, None, Draw(None, hb, cb))
    assert torch.allclose(tree.flatten(h_est), expected, rtol=0, atol=1e-12)
    shared, _ = Exact()(quad, x, y, None, Draw(None, hb, hb))
    assert not torch.allclose(tree.flatten(shared), expected, rtol=0, atol=1e-6)


def test_hypergradient_goes_through_the_objects(quad, monkeypatch):
    """bilevel.hypergradient builds METHODS[method] from its options and calls it once: no
    parallel implementation. The entry's own choices: resample=False (its batches are given),
    warm_start=True (init is the state), linear_sgd's 10 steps."""
    built = []
    for name, cls in METHODS.items():
        class Spy(cls):
            def __call__(self, *args, _cls=cls, **kwargs):
                built.append(self)
                return _cls.__call__(self, *args, **kwargs)
        monkeypatch.setitem(METHODS, name, dataclasses.dataclass(frozen=True)(Spy))
    x, y = quad.point()
    hypergradient(quad, x, y, method="neumann", lr=0.1, steps=3)
    hypergradient(quad, x, y, method="linear_sgd", lr=0.1)
    hypergradient(quad, x, y, method="cg", steps=2, init=tree.zeros_like(y))
    assert [type(e).__mro__[1] for e in built] == [Neumann, LinearSystemSGD, ConjugateGradient]
    assert built[0].resample is False and built[1].steps == 10 and built[2].warm_start is True


def test_states_are_tensors_or_none(quad):
    """Stateful estimators start from a tree of tensors (vmap needs the state's structure fixed
    from init): CG from v = 0, which gives the cold-start estimate bit for bit (r = b - A 0 = b)."""
    x, y = quad.point(at_solution=False)
    cg = ConjugateGradient(steps=3)
    v0 = cg.init(x, y)
    assert set(v0) == set(y) and all(isinstance(t, torch.Tensor) and not t.any() for t in v0.values())
    warm, v1 = cg(quad, x, y, v0, cg.given(None, None))
    cold, _ = cg(quad, x, y, None, cg.given(None, None))
    assert set(v1) == set(y) and all(torch.equal(warm[k], cold[k]) for k in x)
    assert ConjugateGradient(warm_start=False).init(x, y) is None
    assert Neumann(lr=0.1).init(x, y) is None and Exact().init(x, y) is None and ITD(lr=0.1).init(x, y) is None
    z = LinearSystemSGD(lr=0.1).init(x, y)
    assert set(z) == set(y) and all(isinstance(t, torch.Tensor) and not t.any() for t in z.values())
    _, z1 = LinearSystemSGD(lr=0.1)(quad, x, y, z, LinearSystemSGD(lr=0.1).given(None, None))
    assert set(z1) == set(y) and all(isinstance(t, torch.Tensor) for t in z1.values())


def test_draws_come_from_the_generator_only(quad):
    """The one way randomness enters: draw(problem, generator). The same seed gives the same
    draw (batches and Neumann term), for every method's object."""
    for name, cls in METHODS.items():
        options = {"lr": 0.1} if "lr" in {f.name for f in dataclasses.fields(cls)} else {}
        if name == "neumann":
            options["variant"] = "randomized"
        estimator = cls(**options)
        first = estimator.draw(quad, torch.Generator().manual_seed(7))
        second = estimator.draw(quad, torch.Generator().manual_seed(7))
        flat = lambda d: [t for part in d for t in (part if isinstance(part, tuple) else (part,))
                          if isinstance(t, torch.Tensor)]
        assert len(flat(first)) > 0 and all(torch.equal(a, b) for a, b in zip(flat(first), flat(second))), name
        assert first.term == second.term


# ---------------------------------------------------------------------------------------------
# Options: checked once, at construction.

@pytest.mark.parametrize("build, field, rule", [
    (lambda: Neumann(lr="auto"), "lr", "positive number"),
    (lambda: Neumann(lr=-0.1), "lr", "positive number"),
    (lambda: Neumann(lr=0.1, steps=2.5), "steps", "integer"),
    (lambda: Neumann(lr=0.1, variant="newton"), "variant", "one of"),
    (lambda: Neumann(lr=0.1, variant="code_n2", steps=0), "steps", ">= 1"),
    (lambda: Neumann(lr=0.1, hvp_mode="sideways"), "hvp_mode", "one of"),
    (lambda: Neumann(lr=0.1, resample="yes"), "resample", "True or False"),
    (lambda: ConjugateGradient(steps=0), "steps", ">= 1"),
    (lambda: ConjugateGradient(tol=-1.0), "tol", ">= 0"),
    (lambda: ConjugateGradient(negative_curvature="ignore"), "negative_curvature", "one of"),
    (lambda: ConjugateGradient(hvp_mode="fwd"), "hvp_mode", "one of"),
    (lambda: LinearSystemSGD(lr=0.1, radius=0.0), "radius", "positive number or None"),
    (lambda: LinearSystemSGD(lr=float("nan")), "lr", "positive number"),
    (lambda: FixedPoint(steps=-1), "steps", ">= 1"),
    (lambda: ITD(lr=0.1, steps=3, truncate=4), "truncate", "[0, steps = 3]"),
])
def test_invalid_values_name_field_and_rule(build, field, rule):
    with pytest.raises(ValueError) as info:
        build()
    message = str(info.value)
    assert f"{field} must be" in message and rule in message, message


def test_entry_rejects_bad_values_and_unknown_options(quad):
    x, y = quad.point()
    with pytest.raises(ValueError, match="lr must be a positive number"):
        hypergradient(quad, x, y, method="neumann", lr=0.0)
    with pytest.raises(ValueError, match="hvp_mode must be one of"):
        hypergradient(quad, x, y, method="cg", hvp_mode="backward")
    with pytest.raises(TypeError, match="resample") as info:  # the entry samples nothing: not an option
        hypergradient(quad, x, y, method="neumann", lr=0.1, resample=True)
    assert "variant" in str(info.value)
    with pytest.raises(TypeError, match="warm_start"):
        hypergradient(quad, x, y, method="cg", warm_start=False)


def test_entry_options_read_once(monkeypatch):
    estimators._ENTRY_OPTIONS.clear()
    calls = []
    original = estimators.fields
    monkeypatch.setattr(estimators, "fields", lambda cls: calls.append(cls) or original(cls))
    for _ in range(3):
        assert set(hypergrad.method_options("cg")) == {"steps", "tol", "hvp_mode", "negative_curvature", "init"}
    assert calls == [ConjugateGradient]


# ---------------------------------------------------------------------------------------------
# hvp_mode: explicit on an estimator, or the run's mode from solve / the command line.

@pytest.fixture
def forward_calls(monkeypatch):
    """Counts calls of the forward-over-reverse products (the jvp path)."""
    calls = []
    original = oracles._forward_second_order

    def spy(*args, **kwargs):
        calls.append(args[5:7])
        return original(*args, **kwargs)
    monkeypatch.setattr(oracles, "_forward_second_order", spy)
    return calls


def test_explicit_mode_and_run_mode(quad, forward_calls):
    x, y = quad.point()
    est = ConjugateGradient(steps=3)
    draw = est.given(None, None)
    reverse, _ = est(quad, x, y, None, draw)
    assert forward_calls == []
    with oracles.second_order_mode("forward"):
        forward, _ = est(quad, x, y, None, draw)
        assert len(forward_calls) == 4  # 3 HVPs and the cross product
        ConjugateGradient(steps=3, hvp_mode="reverse")(quad, x, y, None, draw)  # its own mode wins
        assert len(forward_calls) == 4
    assert torch.allclose(tree.flatten(forward), tree.flatten(reverse), rtol=0, atol=1e-12)
    ConjugateGradient(steps=3, hvp_mode="forward")(quad, x, y, None, draw)
    assert len(forward_calls) == 8
    with pytest.raises(ValueError, match="hvp_mode"):
        with oracles.second_order_mode("sideways"):
            pass


def test_hvp_and_cross_forward_matches_reverse(quad, forward_calls):
    x, y = quad.point()
    v = {k: torch.linspace(-1, 1, t.numel(), dtype=DT).reshape(t.shape) for k, t in y.items()}
    batch = torch.tensor([1, 3, 4])
    with oracles.count_calls() as counts:
        reverse = oracles.hvp_and_cross(quad, x, y, v, batch)
        forward = oracles.hvp_and_cross(quad, x, y, v, batch, mode="forward")
    assert len(forward_calls) == 1 and dict(counts) == {"grad_upper": 0, "grad_lower": 2, "hvp": 2, "cross": 2}
    for r, f in zip(reverse, forward):
        assert torch.allclose(tree.flatten(f), tree.flatten(r), rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", ["stocbio", "aid-cg", "amigo", "soba", "saba", "mrbo", "adambo"])
def test_solve_hvp_mode_reaches_the_products(forward_calls, solver):
    """solve(..., hvp_mode="forward") makes every second-order product of the run a jvp (the
    estimator-based solvers and the SOBA family's shared hvp_and_cross); the result equals the
    reverse-mode run to rounding."""
    from bilevel.registry import make_problem
    quad = make_problem("quadratic", dim_inner=5, dim_outer=3, n_samples_inner=64, n_samples_outer=64, batch_size=16)
    reverse = solve(quad, solver, steps=3, seed=0, initial_eval=False)
    assert forward_calls == []
    forward = solve(quad, solver, steps=3, seed=0, initial_eval=False, hvp_mode="forward")
    assert len(forward_calls) > 0
    if solver == "aid-cg":  # no "auto" step (whose power iteration stays in reverse mode): every product
        assert len(forward_calls) == forward.counts["hvp"] + forward.counts["cross"]
    assert torch.allclose(tree.flatten(forward.x), tree.flatten(reverse.x), rtol=0, atol=1e-10)


def test_solve_rejects_an_unknown_hvp_mode(quad):
    with pytest.raises(ValueError, match="hvp_mode"):
        solve(quad, "soba", steps=1, hvp_mode="sideways")


def test_cli_hvp_mode_reaches_the_products(tmp_path, forward_calls, capsys):
    from bilevel import cli
    args = ["run", "problem=quadratic", "problem_options.dim_inner=5", "problem_options.dim_outer=3",
            "problem_options.n_samples_inner=64", "problem_options.n_samples_outer=64", "solver=aid-cg",
            "steps=2", "eval_every=1", "progress=false", "plot=false", f"output_dir={tmp_path}"]
    assert cli.main([*args, "name=r"]) == 0
    assert forward_calls == []
    assert cli.main([*args, "name=f", "hvp_mode=forward"]) == 0
    assert len(forward_calls) > 0
    assert cli.main([*args, "name=bad", "hvp_mode=sideways"]) == 2
    assert "hvp_mode" in capsys.readouterr().err


def test_entry_reuses_objects_but_checks_every_value(quad):
    """The entry builds one object per distinct hashable options (frozen, so shared safely), yet
    a value equal to a cached one but of another type (True == 1) is still checked."""
    first, _, _ = estimators.from_options("cg", {"steps": 1})
    assert estimators.from_options("cg", {"steps": 1})[0] is first
    with pytest.raises(ValueError, match="steps must be an integer"):
        estimators.from_options("cg", {"steps": True})
    lr = torch.tensor(0.1, dtype=DT)  # unhashable-by-value options are built afresh, still checked
    assert estimators.from_options("neumann", {"lr": lr})[0].lr is lr
    with pytest.raises(ValueError, match="variant"):
        estimators.from_options("neumann", {"lr": 0.1, "variant": ["sum"]})

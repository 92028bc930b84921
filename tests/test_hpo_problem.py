"""Tests of the hyperparameter-optimization problem (learned L2 penalties of a logistic regression)."""
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bilevel
import bilevel.problems.hpo  # noqa: F401  (registers "hpo")
from bilevel import hypergrad, tree
from bilevel.oracles import grad_upper
from bilevel.problem import validate
from bilevel.problems.digits import split_indices
from bilevel.problems.hpo import HyperparameterOptimization
from bilevel.registry import PROBLEMS

DT = torch.float64


def small(**options):
    settings = dict(n_train=80, n_val=80, n_test=80, batch_size=None, val_batch_size=None)
    settings.update(options)
    return HyperparameterOptimization(**settings)


def random_x(problem, seed=1, mean=-1.0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return {"log_penalty": mean + scale * torch.randn(problem.dim_x, generator=g, dtype=DT)}


def random_y(problem, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return {"W": scale * torch.randn(problem.n_features, problem.n_classes, generator=g, dtype=DT),
            "b": scale * torch.randn(problem.n_classes, generator=g, dtype=DT)}


def solve_lower(problem, x, y0, iterations=60):
    """y*(x) by damped Newton on the flattened y (dense Hessian from torch.func.hessian), to
    |grad_y g| < 1e-12; Armijo backtracking keeps the first steps from y = 0 stable."""
    yf = tree.flatten(y0).detach().clone()

    def g(v):
        return problem.lower_loss(x, tree.unflatten(v, y0), None)

    for _ in range(iterations):
        grad = torch.func.grad(g)(yf)
        if float(grad.norm()) < 1e-12:
            return tree.unflatten(yf, y0)
        step = torch.linalg.solve(torch.func.hessian(g)(yf), grad)
        t, value, decrease = 1.0, g(yf), float(grad @ step)
        while decrease > 1e-12 and g(yf - t * step) > value - 0.25 * t * decrease and t > 1e-10:
            t /= 2
        yf = yf - t * step
    raise AssertionError(f"Newton did not converge: |grad g| = {float(grad.norm()):.2e}")


def phi(problem, x, y_start):
    """Phi(x) = f(x, y*(x)) on the whole validation split."""
    return float(problem.upper_loss(x, solve_lower(problem, x, y_start), None))


# -- 1. data and splits ------------------------------------------------------------------------

def test_splits_deterministic_disjoint_and_sized():
    a, b = HyperparameterOptimization(seed=3), HyperparameterOptimization(seed=3)
    assert (a.n_train, a.n_val, a.n_test) == (300, 134, 135)
    for name in ("train_features", "val_features", "test_features", "train_labels", "val_labels", "test_labels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    other = HyperparameterOptimization(seed=4)
    assert not torch.equal(a.train_labels, other.train_labels) or not torch.equal(a.train_features, other.train_features)
    train, val, test = split_indices(569, (300, 134, 135), seed=3)
    union = np.concatenate([train, val, test])
    assert len(np.unique(union)) == 569
    # The problem's rows are those of the split: the same raw rows, standardized with train stats.
    from sklearn.datasets import load_breast_cancer
    raw = load_breast_cancer().data
    mean, std = raw[train].mean(0), raw[train].std(0)
    np.testing.assert_allclose(a.val_features.numpy(), (raw[val] - mean) / std, rtol=1e-12)
    np.testing.assert_array_equal(a.test_labels.numpy(), load_breast_cancer().target[test])


def test_features_standardized_on_train():
    for dataset in ("breast-cancer", "digits"):
        problem = HyperparameterOptimization(dataset=dataset)
        feats = problem.train_features
        assert torch.allclose(feats.mean(0), torch.zeros(problem.n_features, dtype=DT), atol=1e-10)
        std = feats.std(0, unbiased=False)
        assert torch.allclose(std[std > 0], torch.ones_like(std[std > 0]))
        assert not torch.allclose(problem.val_features.mean(0), torch.zeros(problem.n_features, dtype=DT), atol=1e-3)


@pytest.mark.parametrize("dataset, regularization, d, c, dim_x, sizes", [
    ("breast-cancer", None, 30, 2, 30, (300, 134, 135)),
    ("breast-cancer", "per-class", 30, 2, 2, (300, 134, 135)),
    ("digits", None, 64, 10, 10, (1000, 400, 397)),
    ("digits", "per-feature", 64, 10, 64, (1000, 400, 397)),
])
def test_shapes_per_dataset_and_regularization(dataset, regularization, d, c, dim_x, sizes):
    problem = HyperparameterOptimization(dataset=dataset, regularization=regularization)
    assert problem.regularization == regularization or regularization is None
    assert (problem.n_features, problem.n_classes, problem.dim_x) == (d, c, dim_x)
    assert (problem.n_train, problem.n_val, problem.n_test) == sizes
    assert problem.train_features.shape == (sizes[0], d) and problem.test_labels.shape == (sizes[2],)
    assert int(problem.train_labels.max()) == c - 1 and problem.train_labels.dtype == torch.long
    x, y = problem.init(torch.Generator())
    assert x["log_penalty"].shape == (dim_x,) and x["log_penalty"].dtype == DT
    assert y["W"].shape == (d, c) and y["b"].shape == (c,)
    assert problem.lower_loss(x, y, None).shape == () and problem.upper_loss(x, y, None).shape == ()


def test_default_regularization_follows_benchopt():
    assert HyperparameterOptimization().regularization == "per-feature"  # ijcnn1-style
    assert HyperparameterOptimization(dataset="digits").regularization == "per-class"  # covtype-style


# -- 2. losses ---------------------------------------------------------------------------------

def test_penalty_matches_hand_computation():
    W = torch.tensor([[1.0, -2.0], [0.5, 0.0], [3.0, 1.0]], dtype=DT)  # d = 3 rows, C = 2 columns
    y = {"W": W, "b": torch.tensor([7.0, -7.0], dtype=DT)}  # the bias is not penalized
    feature = small(regularization="per-feature")
    xf = {"log_penalty": torch.tensor([0.0, np.log(2.0), np.log(0.5)], dtype=DT)}
    # rows: ||W_0||^2 = 5, ||W_1||^2 = 0.25, ||W_2||^2 = 10 -> 1/2 (1*5 + 2*0.25 + 0.5*10) = 5.25
    assert float(feature.penalty(xf, y)) == pytest.approx(5.25, rel=1e-14)
    cls = small(regularization="per-class")
    xc = {"log_penalty": torch.tensor([np.log(3.0), 0.0], dtype=DT)}
    # columns: ||W_:0||^2 = 10.25, ||W_:1||^2 = 5 -> 1/2 (3*10.25 + 1*5) = 17.875
    assert float(cls.penalty(xc, y)) == pytest.approx(17.875, rel=1e-14)


def test_lower_loss_is_ce_plus_penalty_plus_floor():
    for regularization in ("per-feature", "per-class"):
        problem = small(regularization=regularization, reg_floor=0.01)
        x, y = random_x(problem), random_y(problem)
        exp_x = torch.exp(x["log_penalty"])
        norms = y["W"].square().sum(1 if regularization == "per-feature" else 0)
        total = 0.0
        for a, c in zip(problem.train_features, problem.train_labels):  # explicit loop over samples
            logits = a @ y["W"] + y["b"]
            total += torch.logsumexp(logits, 0) - logits[c]
        expected = (total / problem.n_train + 0.5 * (exp_x * norms).sum()
                    + 0.01 * (y["W"].square().sum() + y["b"].square().sum()))
        assert torch.allclose(problem.lower_loss(x, y, None), expected, rtol=1e-12)
        batch = torch.tensor([4, 4, 0, 79])
        ce = F.cross_entropy(problem.train_features[batch] @ y["W"] + y["b"], problem.train_labels[batch])
        expected_batch = ce + problem.penalty(x, y) + 0.01 * (y["W"].square().sum() + y["b"].square().sum())
        assert torch.allclose(problem.lower_loss(x, y, batch), expected_batch, rtol=1e-12)


def test_uniform_penalty_is_the_same_for_both_regularizations():
    y = random_y(small())
    feature, cls = small(regularization="per-feature"), small(regularization="per-class")
    value = 0.7
    a = feature.lower_loss({"log_penalty": torch.full((30,), value, dtype=DT)}, y, None)
    b = cls.lower_loss({"log_penalty": torch.full((2,), value, dtype=DT)}, y, None)
    assert torch.allclose(a, b, rtol=1e-13)


def test_upper_loss_is_validation_ce_independent_of_x():
    problem = small(regularization="per-feature")
    y = random_y(problem)
    expected = F.cross_entropy(problem.val_features @ y["W"] + y["b"], problem.val_labels)
    for x in (random_x(problem, seed=1), random_x(problem, seed=2, mean=3.0)):
        assert torch.equal(problem.upper_loss(x, y, None), expected)
    gx, gy = grad_upper(problem, random_x(problem), y, None)
    assert torch.equal(gx["log_penalty"], torch.zeros(30, dtype=DT))
    assert float(tree.norm(gy)) > 0
    batch = torch.tensor([1, 2, 2])
    assert torch.allclose(problem.upper_loss(random_x(problem), y, batch),
                          F.cross_entropy(problem.val_features[batch] @ y["W"] + y["b"], problem.val_labels[batch]))


def test_lower_hessian_positive_definite_even_without_penalty():
    problem = small(regularization="per-class", reg_floor=1e-4)
    x = {"log_penalty": torch.full((2,), -40.0, dtype=DT)}  # exp(x) ~ 4e-18: only the floor is left
    y = random_y(problem)

    def g(v):
        return problem.lower_loss(x, tree.unflatten(v, y), None)

    eigenvalues = torch.linalg.eigvalsh(torch.func.hessian(g)(tree.flatten(y)))
    assert float(eigenvalues.min()) >= 2e-4 * (1 - 1e-6)


def test_sample_and_n_samples():
    problem = small(batch_size=7, val_batch_size=5)
    g = torch.Generator().manual_seed(0)
    lower, upper = problem.sample("lower", g), problem.sample("upper", g)
    assert lower.shape == (7,) and lower.dtype == torch.long and 0 <= int(lower.min()) <= int(lower.max()) < 80
    assert upper.shape == (5,) and 0 <= int(upper.min()) <= int(upper.max()) < 80
    assert small().sample("lower", g) is None and small().sample("upper", g) is None
    assert problem.n_samples("lower") == 80 and HyperparameterOptimization().n_samples("upper") == 134
    with pytest.raises(ValueError, match="level"):
        problem.sample("middle", g)
    with pytest.raises(ValueError, match="level"):
        problem.n_samples("middle")


# -- 3. metrics --------------------------------------------------------------------------------

def test_evaluate_global_metrics_without_modifying_inputs():
    problem = small(n_test=120, regularization="per-feature")
    x, y = random_x(problem), random_y(problem)
    x_before, y_before = tree.clone(x), tree.clone(y)
    metrics = problem.evaluate(x, y)
    assert set(metrics) >= {"val_loss", "test_accuracy", "test_loss", "mean_log_penalty"}
    test_logits = problem.test_features @ y["W"] + y["b"]
    assert metrics["test_loss"] == pytest.approx(float(F.cross_entropy(test_logits, problem.test_labels)), rel=1e-12)
    assert metrics["test_accuracy"] == pytest.approx(float((test_logits.argmax(1) == problem.test_labels).double().mean()))
    assert metrics["val_loss"] == pytest.approx(float(problem.upper_loss(x, y, None)), rel=1e-12)
    assert metrics["mean_log_penalty"] == pytest.approx(float(x["log_penalty"].mean()), rel=1e-12)
    assert all(torch.equal(x[k], x_before[k]) for k in x) and all(torch.equal(y[k], y_before[k]) for k in y)
    assert HyperparameterOptimization.headline_metrics == ("val_loss", "test_accuracy")
    x0, y0 = problem.init(torch.Generator())
    assert problem.evaluate(x0, y0)["val_loss"] == pytest.approx(np.log(2.0))


# -- 4. hypergradient --------------------------------------------------------------------------

@pytest.mark.parametrize("regularization, coordinates", [("per-feature", (0, 7, 29)), ("per-class", (0, 1))])
def test_exact_hypergradient_matches_finite_differences(regularization, coordinates):
    problem = small(regularization=regularization)
    _, y0 = problem.init(torch.Generator())
    x = random_x(problem)
    y_star = solve_lower(problem, x, y0)
    exact = hypergrad.exact(problem, x, y_star, None, None)[0]["log_penalty"]
    eps = 1e-4
    for j in coordinates:
        e = torch.zeros(problem.dim_x, dtype=DT)
        e[j] = eps
        fd = (phi(problem, {"log_penalty": x["log_penalty"] + e}, y_star)
              - phi(problem, {"log_penalty": x["log_penalty"] - e}, y_star)) / (2 * eps)
        assert abs(fd - float(exact[j])) <= 1e-5 * abs(float(exact[j])), (j, fd, float(exact[j]))
    cg = bilevel.hypergradient(problem, x, y_star, None, None, method="cg", steps=60)["log_penalty"]
    assert float((cg - exact).norm()) <= 1e-6 * float(exact.norm())


# -- 5. solvers improve the validation loss ----------------------------------------------------

@pytest.mark.parametrize("regularization", ["per-feature", "per-class"])
@pytest.mark.parametrize("solver, hyperparameters", [
    ("aid-cg", dict(upper_lr=5.0, lower_lr=0.5, inner_steps=10, cg_steps=10)),
    ("soba", dict(upper_lr=5.0, lower_lr=0.5)),
    ("bo-rep", dict(upper_lr=0.1, lower_lr=0.5)),
])
def test_solver_decreases_validation_loss(regularization, solver, hyperparameters):
    problem = small(regularization=regularization, batch_size=32, val_batch_size=32)
    x0, y0 = problem.init(torch.Generator())
    result = bilevel.solve(problem, solver, steps=30, seed=0, **hyperparameters)
    assert result.final["val_loss"] < result.history[0]["val_loss"]
    assert result.final["mean_log_penalty"] < -0.2  # weaker penalties than exp(0) = 1 fit val better
    # Phi at the lower solution, so that the decrease is due to x and not to y leaving y0 = 0.
    assert phi(problem, result.x, y0) < phi(problem, x0, y0) - 0.03


# -- 6. registry and validation ----------------------------------------------------------------

def test_registry_create_and_validate():
    problem = PROBLEMS.create("hpo", dataset="digits", regularization="per-class")
    assert isinstance(problem, HyperparameterOptimization) and problem.name == "hpo"
    g = torch.Generator().manual_seed(0)
    x, y = problem.init(g)
    assert x["log_penalty"].shape == (10,) and y["W"].shape == (64, 10)
    validate(problem, x, y, g)
    assert problem.sample("lower", g).shape == (64,)
    single = PROBLEMS.create("hpo", dtype="float32", x0=-2.0)
    x32, y32 = single.init(g)
    assert x32["log_penalty"].dtype == torch.float32 and torch.equal(x32["log_penalty"], torch.full((30,), -2.0))
    assert single.lower_loss(x32, y32, single.sample("lower", g)).dtype == torch.float32
    with pytest.raises(TypeError, match="regularisation"):
        PROBLEMS.create("hpo", regularisation="per-class")


@pytest.mark.parametrize("option, value", [
    ("dataset", "covtype"), ("regularization", "per-sample"), ("n_train", 0), ("n_val", 2.5), ("n_test", True),
    ("reg_floor", 0.0), ("reg_floor", float("nan")), ("x0", float("inf")), ("x0", "zero"), ("batch_size", 0),
    ("val_batch_size", 1.0), ("seed", "zero"), ("dtype", "float16"),
])
def test_invalid_options_name_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        HyperparameterOptimization(**{option: value})


def test_split_sizes_exceeding_data_raise():
    with pytest.raises(ValueError, match="n_train.*569"):
        HyperparameterOptimization(n_train=400, n_val=100, n_test=100)
    HyperparameterOptimization(dataset="digits", n_train=400, n_val=100, n_test=100)  # fits 1797


def test_missing_scikit_learn_gives_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes `from sklearn.datasets import` fail
    with pytest.raises(ImportError, match="scikit-learn"):
        HyperparameterOptimization()
    with pytest.raises(ImportError, match="scikit-learn"):
        HyperparameterOptimization(dataset="digits")

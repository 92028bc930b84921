"""Tests of the digits data helpers and the data hyper-cleaning problem."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bilevel import hypergrad, tree
from bilevel.oracles import grad_upper
from bilevel.problem import validate
from bilevel.problems.digits import N_SAMPLES, corrupt_labels, split_indices, standardize
from bilevel.problems.hyperclean_digits import HypercleanDigits
from bilevel.registry import PROBLEMS


def small(**options):
    settings = dict(n_train=100, n_val=50, n_test=50, dtype="float64")
    settings.update(options)
    return HypercleanDigits(**settings)


def random_y(problem, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return {"W": scale * torch.randn(problem.n_features, 10, generator=g, dtype=torch.float64),
            "b": scale * torch.randn(10, generator=g, dtype=torch.float64)}


# -- 1. splits ---------------------------------------------------------------------------------

def test_splits_disjoint_sized_and_seeded():
    train, val, test = split_indices(N_SAMPLES, (1000, 300, 497), seed=3)
    assert (len(train), len(val), len(test)) == (1000, 300, 497)
    union = np.concatenate([train, val, test])
    assert len(np.unique(union)) == len(union) and union.min() >= 0 and union.max() < N_SAMPLES
    again = split_indices(N_SAMPLES, (1000, 300, 497), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    other = split_indices(N_SAMPLES, (1000, 300, 497), seed=4)
    assert not np.array_equal(train, other[0])


def test_split_sizes_exceeding_data_raise():
    with pytest.raises(ValueError, match="1797"):
        split_indices(N_SAMPLES, (1000, 500, 400), seed=0)
    with pytest.raises(ValueError, match="n_train"):
        HypercleanDigits(n_train=1000, n_val=500, n_test=400)


def test_standardize_uses_train_statistics_only():
    train = np.array([[0.0, 1.0], [2.0, 1.0]])
    other = np.array([[4.0, 3.0]])
    s_train, s_other = standardize(train, other)
    np.testing.assert_allclose(s_train, [[-1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(s_other, [[3.0, 2.0]])  # constant column: centred only


def test_problem_features_standardized_on_train():
    problem = small()
    feats = problem.train_features
    assert torch.allclose(feats.mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-10)
    std = feats.std(0, unbiased=False)
    assert torch.allclose(std[std > 0], torch.ones_like(std[std > 0]))
    assert problem.val_features.abs().max() < 1e3


# -- 2. corruption -----------------------------------------------------------------------------

def test_corruption_counts_and_changes_exactly_the_chosen_labels():
    problem = small(n_train=100, noise_rate=0.37, seed=5)
    mask, noisy, clean = problem.corrupted_mask, problem.train_labels_noisy, problem.train_labels_clean
    assert mask.dtype == torch.bool and int(mask.sum()) == 37
    assert bool((noisy[mask] != clean[mask]).all())
    assert bool((noisy[~mask] == clean[~mask]).all())
    assert int(noisy.min()) >= 0 and int(noisy.max()) < 10


def test_corruption_deterministic_and_validated():
    labels = np.arange(200) % 10
    noisy, mask = corrupt_labels(labels, 0.5, 10, seed=1)
    noisy2, mask2 = corrupt_labels(labels, 0.5, 10, seed=1)
    assert np.array_equal(noisy, noisy2) and np.array_equal(mask, mask2)
    noisy3, mask3 = corrupt_labels(labels, 0.5, 10, seed=2)
    assert not np.array_equal(mask, mask3)
    assert np.array_equal(labels, np.arange(200) % 10)  # input untouched
    assert torch.equal(small(seed=2).corrupted_mask, small(seed=2).corrupted_mask)
    with pytest.raises(ValueError, match="noise_rate"):
        corrupt_labels(labels, 1.0, 10, seed=1)
    with pytest.raises(ValueError, match="noise_rate"):
        small(noise_rate=1.0)


# -- 3. losses ---------------------------------------------------------------------------------

def test_lower_loss_at_zero_is_weighted_log10():
    problem = small()
    x, y = problem.init(torch.Generator())
    x["weight_logits"] = torch.randn(problem.n_train, dtype=torch.float64)
    expected = torch.sigmoid(x["weight_logits"]).mean() * math.log(10)
    assert torch.allclose(problem.lower_loss(x, y, None), expected, rtol=1e-12)


def reference_lower(problem, x, y, indices):
    """g by an explicit loop over samples: -log softmax of the noisy label, weighted."""
    total = 0.0
    for i in indices:
        logits = problem.train_features[i] @ y["W"] + y["b"]
        ce = torch.logsumexp(logits, 0) - logits[problem.train_labels_noisy[i]]
        total += torch.sigmoid(x["weight_logits"][i]) * ce
    return total / len(indices) + problem.reg * (y["W"].square().sum() + y["b"].square().sum())


def test_lower_loss_matches_explicit_loop():
    problem = small(reg=0.1)
    y = random_y(problem)
    x = {"weight_logits": torch.randn(problem.n_train, dtype=torch.float64)}
    full = reference_lower(problem, x, y, range(problem.n_train))
    assert torch.allclose(problem.lower_loss(x, y, None), full, rtol=1e-12)
    batch = torch.tensor([3, 3, 17, 99, 0])
    assert torch.allclose(problem.lower_loss(x, y, batch), reference_lower(problem, x, y, batch.tolist()), rtol=1e-12)


def test_upper_loss_is_clean_validation_ce_independent_of_x():
    problem = small()
    y = random_y(problem)
    x = {"weight_logits": torch.randn(problem.n_train, dtype=torch.float64)}
    expected = F.cross_entropy(problem.val_features @ y["W"] + y["b"], problem.val_labels)
    assert torch.allclose(problem.upper_loss(x, y, None), expected)
    gx, gy = grad_upper(problem, x, y, None)
    assert torch.equal(gx["weight_logits"], torch.zeros(problem.n_train, dtype=torch.float64))
    assert float(tree.norm(gy)) > 0


def test_sample_shapes_ranges_and_full_batch():
    problem = small(batch_size=7, val_batch_size=5, sampling="replacement")  # blocks: test_sampling_blocks.py
    g = torch.Generator().manual_seed(0)
    lower, upper = problem.sample("lower", g), problem.sample("upper", g)
    assert lower.shape == (7,) and lower.dtype == torch.long and 0 <= int(lower.min()) <= int(lower.max()) < 100
    assert upper.shape == (5,) and 0 <= int(upper.min()) <= int(upper.max()) < 50
    full = small(batch_size=None, val_batch_size=None)
    assert full.sample("lower", g) is None and full.sample("upper", g) is None


# -- 4. metrics --------------------------------------------------------------------------------

def test_detection_metrics_by_hand():
    problem = small(n_train=100, noise_rate=0.3)
    corrupted = problem.corrupted_mask.nonzero().flatten()
    clean = (~problem.corrupted_mask).nonzero().flatten()
    flagged = torch.cat([corrupted[:20], clean[:5]])  # tp = 20, fp = 5, fn = 10
    logits = torch.full((100,), 3.0, dtype=torch.float64)
    logits[flagged] = -3.0
    x = {"weight_logits": logits}
    y = random_y(problem)
    x_before, y_before = tree.clone(x), tree.clone(y)
    metrics = problem.evaluate(x, y)
    precision, recall = 20 / 25, 20 / 30
    assert metrics["precision"] == pytest.approx(precision)
    assert metrics["recall"] == pytest.approx(recall)
    assert metrics["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert all(torch.equal(x[k], x_before[k]) for k in x) and all(torch.equal(y[k], y_before[k]) for k in y)
    test_acc = (problem.test_features @ y["W"] + y["b"]).argmax(1).eq(problem.test_labels).double().mean()
    train_acc = (problem.train_features @ y["W"] + y["b"]).argmax(1).eq(problem.train_labels_clean).double().mean()
    assert metrics["test_accuracy"] == pytest.approx(float(test_acc))
    assert metrics["train_accuracy_clean"] == pytest.approx(float(train_acc))
    assert metrics["val_loss"] == pytest.approx(float(problem.upper_loss(x, y, None)))


def test_f1_is_zero_when_nothing_flagged():
    problem = small()
    x, y = problem.init(torch.Generator())  # all weights exactly 0.5: none below the threshold
    metrics = problem.evaluate(x, y)
    assert metrics["f1"] == 0.0 and metrics["precision"] == 0.0 and metrics["recall"] == 0.0


# -- 5. hypergradient --------------------------------------------------------------------------

def solve_lower(problem, x, y0, iterations=50):
    """y*(x) by damped Newton on the flattened y, to machine precision (the lower problem is small
    and strongly convex; full Newton steps diverge from y = 0 on these nearly separable data)."""
    yf = tree.flatten(y0).detach().clone()

    def g(v):
        return problem.lower_loss(x, tree.unflatten(v, y0), None)

    for _ in range(iterations):
        grad = torch.func.grad(g)(yf)
        if float(grad.norm()) < 1e-13:
            return tree.unflatten(yf, y0)
        step = torch.linalg.solve(torch.func.jacrev(torch.func.grad(g))(yf), grad)
        t, value, decrease = 1.0, g(yf), float(grad @ step)
        # Armijo backtracking, skipped in the quadratic regime where rounding hides the decrease.
        while decrease > 1e-12 and g(yf - t * step) > value - 0.25 * t * decrease and t > 1e-10:
            t /= 2
        yf = yf - t * step
    raise AssertionError(f"Newton did not converge: |grad g| = {float(grad.norm()):.2e}")


def test_exact_hypergradient_matches_finite_differences():
    problem = HypercleanDigits(n_train=60, n_val=40, n_test=40, reg=1e-2, dtype="float64",
                               batch_size=None, val_batch_size=None)
    x0, y0 = problem.init(torch.Generator())
    x = {"weight_logits": torch.randn(60, generator=torch.Generator().manual_seed(1), dtype=torch.float64)}
    y_star = solve_lower(problem, x, y0)
    exact = hypergrad.exact(problem, x, y_star, None, None)[0]["weight_logits"]

    def phi(logits):
        shifted = {"weight_logits": logits}
        return float(problem.upper_loss(shifted, solve_lower(problem, shifted, y_star), None))

    eps = 1e-4
    for i in (0, 17, 42):
        e = torch.zeros(60, dtype=torch.float64)
        e[i] = eps
        fd = (phi(x["weight_logits"] + e) - phi(x["weight_logits"] - e)) / (2 * eps)
        assert abs(fd - float(exact[i])) <= 1e-5 * abs(float(exact[i])), (i, fd, float(exact[i]))


# -- 6. registry and validation ----------------------------------------------------------------

def test_registry_create_and_errors():
    problem = PROBLEMS.create("hyperclean-digits", n_train=100, n_val=50, n_test=50)
    assert isinstance(problem, HypercleanDigits) and problem.name == "hyperclean-digits"
    g = torch.Generator().manual_seed(0)
    x, y = problem.init(g)
    assert x["weight_logits"].shape == (100,) and y["W"].shape == (64, 10) and y["b"].shape == (10,)
    assert x["weight_logits"].dtype == torch.float32
    validate(problem, x, y, g)
    with pytest.raises(TypeError, match="n_trian"):
        PROBLEMS.create("hyperclean-digits", n_trian=100)
    with pytest.raises(ValueError, match="level"):
        problem.sample("middle", g)


@pytest.mark.parametrize("option, value", [
    ("n_train", 0), ("n_val", 2.5), ("noise_rate", -0.1), ("reg", 0.0), ("batch_size", 0),
    ("val_batch_size", True), ("seed", "zero"), ("dtype", "float16"), ("flag_threshold", 1.0),
])
def test_invalid_options_name_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        small(**{option: value})


def test_detection_auc_is_the_pairwise_ranking_probability():
    from bilevel.problems.cleaning import detection_auc

    logits = torch.tensor([-2.0, 0.5, -1.0, 1.0, 0.5, -3.0])
    corrupted = torch.tensor([True, False, True, False, True, False])
    # pairs (corrupted i, clean j) with x_i < x_j count 1, ties 1/2: by hand
    pairs = [(i, j) for i in range(6) if corrupted[i] for j in range(6) if not corrupted[j]]
    expected = sum(1.0 if logits[i] < logits[j] else 0.5 if logits[i] == logits[j] else 0.0
                   for i, j in pairs) / len(pairs)
    assert detection_auc(logits, corrupted) == pytest.approx(expected)
    assert expected not in (0.0, 0.5, 1.0)  # the example exercises wins, losses and a tie
    assert detection_auc(logits, torch.zeros(6, dtype=torch.bool)) == 0.5
    assert detection_auc(-logits, corrupted) == pytest.approx(1 - expected)

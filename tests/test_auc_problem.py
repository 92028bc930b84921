"""Tests of the deep AUC maximization problem (AUC-M loss, AccBO NeurIPS 2024) on fixture data."""
import itertools

import numpy as np
import pytest
import torch
from data_fixtures import write_rotten_tomatoes, write_sent140_leaf, write_table

import bilevel
import bilevel.problems.auc  # noqa: F401  (registers "auc")
from bilevel import hypergrad, oracles, tree
from bilevel.problems.auc import DeepAUC, auc_margin_loss, batch_mean_auc
from bilevel.registry import PROBLEMS

DT = torch.float64


@pytest.fixture(scope="module")
def rt_path(tmp_path_factory):
    return str(write_rotten_tomatoes(tmp_path_factory.mktemp("auc") / "rt.csv.bz2", n=600, seed=0))


def small(path, **options):
    """A float64 problem with a very small model (exact Jacobians stay cheap)."""
    settings = dict(data_path=path, n_train=40, n_val=40, n_test=70, cell="rnn", hidden=3, embed_dim=3, fc=3,
                    max_len=12, max_vocab=25, batch_size=8, val_batch_size=8, dtype="float64")
    settings.update(options)
    return DeepAUC(**settings)


@pytest.fixture(scope="module")
def problem(rt_path):
    return small(rt_path)


def random_point(problem, seed=0, scale=0.4):
    """The model's initialisation, perturbed, with a, b, alpha away from 0."""
    g = torch.Generator().manual_seed(seed)
    x, _ = problem.init(g)
    x = {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in x.items()}
    return x, {"alpha": torch.tensor(0.3, dtype=DT)}


def direction(t, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in t.items()}


def pairwise_auc(labels, scores):
    """AUC by counting ordered (positive, negative) pairs, ties counting 1/2 (Mann-Whitney)."""
    pos = [s for s, c in zip(scores, labels) if c == 1]
    neg = [s for s, c in zip(scores, labels) if c == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


# -- the loss and its closed-form lower solution -----------------------------------------------

def hand_loss(problem, x, alpha, tokens, labels, batch):
    """L of the module docstring, one sample at a time."""
    p, m, a, b = problem.p, problem.margin, float(x["a"]), float(x["b"])
    total = 0.0
    for i in batch.tolist():
        h = float(problem.scores(x, tokens[i:i + 1])[0])
        if int(labels[i]) == 1:
            total += (1 - p) * (h - a) ** 2 + 2 * (alpha + 1) * (p * (1 - p) * m - (1 - p) * h)
        else:
            total += p * (h - b) ** 2 + 2 * (alpha + 1) * (p * (1 - p) * m + p * h)
    return total / len(batch) - p * (1 - p) * alpha ** 2


def test_losses_match_per_sample_formula(problem):
    x, y = random_point(problem)
    batch = torch.tensor([0, 3, 3, 17, 39])
    data = problem.data
    upper = hand_loss(problem, x, 0.3, data.val_tokens, data.val_labels, batch)
    lower = -hand_loss(problem, x, 0.3, data.train_tokens, data.train_labels, batch)
    assert float(problem.upper_loss(x, y, batch)) == pytest.approx(upper, rel=1e-12)
    assert float(problem.lower_loss(x, y, batch)) == pytest.approx(lower, rel=1e-12)


def test_alpha_star_is_the_lower_minimizer(problem):
    x, y = random_point(problem, seed=1)
    batch = torch.tensor([1, 5, 9, 9, 20, 33, 38])
    star = problem.alpha_star(x, batch)
    # gradient zero at the closed form, curvature 2 p (1 - p) everywhere
    for alpha in (star, star + 1.7, torch.tensor(-3.0, dtype=DT)):
        a = alpha.detach().clone().requires_grad_(True)
        (d1,) = torch.autograd.grad(problem.lower_loss(x, {"alpha": a}, batch), a, create_graph=True)
        (d2,) = torch.autograd.grad(d1, a)
        assert float(d2) == pytest.approx(2 * problem.p * (1 - problem.p), rel=1e-12)
        if alpha is star:
            assert abs(float(d1.detach())) < 1e-12
    # plain gradient descent with the lower oracle finds the same minimizer
    alpha = {"alpha": torch.tensor(0.0, dtype=DT)}
    step = 1 / (2 * problem.p * (1 - problem.p))
    for _ in range(3):
        gy = oracles.grad_lower(problem, x, alpha, batch)[1]
        alpha = {"alpha": alpha["alpha"] - 0.5 * step * gy["alpha"]}
    assert float(alpha["alpha"]) != pytest.approx(float(star), abs=1e-3)  # not yet there
    for _ in range(60):
        gy = oracles.grad_lower(problem, x, alpha, batch)[1]
        alpha = {"alpha": alpha["alpha"] - 0.5 * step * gy["alpha"]}
    assert float(alpha["alpha"]) == pytest.approx(float(star), abs=1e-12)


def test_exact_hypergradient_matches_finite_differences(problem):
    x, _ = random_point(problem, seed=2)

    def phi(xx):
        return problem.upper_loss(xx, {"alpha": problem.alpha_star(xx, None)}, None)

    y_star = {"alpha": problem.alpha_star(x, None).detach()}
    hg, v = hypergrad.exact(problem, x, y_star, None, None)
    d = direction(x, seed=3)
    eps = 1e-5
    plus, minus = phi(tree.axpy(eps, d, x)), phi(tree.axpy(-eps, d, x))
    fd = float(plus - minus) / (2 * eps)
    exact = float(tree.dot(hg, d))
    assert abs(exact - fd) <= 1e-7 * max(1.0, abs(fd)), (exact, fd)
    # and the whole gradient agrees with autograd through the closed form
    leaves = {k: t.detach().clone().requires_grad_(True) for k, t in x.items()}
    auto = torch.autograd.grad(phi(leaves), list(leaves.values()))
    assert tree.relative_error(hg, dict(zip(leaves, auto))) < 1e-10
    # at a y away from alpha*, the implicit formula differs from grad Phi
    off, _ = hypergrad.exact(problem, x, {"alpha": y_star["alpha"] + 1.0}, None, None)
    assert tree.relative_error(off, hg) > 1e-3


def test_hvp_and_cross_forward_reverse_and_finite_differences(problem):
    x, y = random_point(problem, seed=4)
    batch = torch.tensor([2, 4, 6, 8, 30])
    v = {"alpha": torch.tensor(-0.8, dtype=DT)}
    hv_r, hv_f = (oracles.hvp(problem, x, y, v, batch, mode=m) for m in ("reverse", "forward"))
    expected = 2 * problem.p * (1 - problem.p) * -0.8
    assert float(hv_r["alpha"]) == pytest.approx(expected, rel=1e-12)
    assert float(hv_f["alpha"]) == pytest.approx(expected, rel=1e-12)
    cr_r, cr_f = (oracles.cross(problem, x, y, v, batch, mode=m) for m in ("reverse", "forward"))
    assert tree.relative_error(cr_f, cr_r) < 1e-12
    eps = 1e-6
    gp = oracles.grad_lower(problem, x, {"alpha": y["alpha"] + eps * v["alpha"]}, batch)[0]
    gm = oracles.grad_lower(problem, x, {"alpha": y["alpha"] - eps * v["alpha"]}, batch)[0]
    fd = tree.scale(tree.sub(gp, gm), 1 / (2 * eps))
    assert tree.relative_error(cr_r, fd) < 1e-7


# -- data --------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.8, 0.3, None])
def test_imbalanced_splits_exact_and_disjoint(rt_path, ratio):
    pb = small(rt_path, n_train=50, n_val=30, n_test=60, positive_ratio=ratio)
    train, val, test = pb.split_indices
    assert len(set(train) | set(val) | set(test)) == 140
    assert (len(train), len(val), len(test)) == (50, 30, 60)
    from bilevel.problems.corpora import load_corpus
    labels = load_corpus("rotten-tomatoes", data_path=rt_path).labels
    np.testing.assert_array_equal(pb.data.train_labels.numpy(), labels[train])
    np.testing.assert_array_equal(pb.data.test_labels.numpy(), labels[test])
    if ratio is not None:
        assert int(pb.data.train_labels.sum()) == round(ratio * 50)
        assert int(pb.data.val_labels.sum()) == round(ratio * 30)
        assert pb.p == round(ratio * 50) / 50
    # the test split is the same for every ratio: the natural-ratio head of the permutation
    assert list(test) == list(small(rt_path, n_train=50, n_val=30, n_test=60, positive_ratio=0.5).split_indices[2])


def test_sent140_user_file(tmp_path):
    path = write_sent140_leaf(tmp_path / "train.json", n_users=20, per_user=10)
    pb = small(str(path), dataset="sent140", n_train=40, n_val=20, n_test=40, positive_ratio=0.75)
    assert int(pb.data.train_labels.sum()) == 30 and pb.p == 0.75


# -- metrics -----------------------------------------------------------------------------------

def test_batch_mean_auc_by_hand():
    labels = np.array([1, 0, 1, 0, 1, 1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.1, 0.4, 0.5, 0.3, 0.3, 0.8, 0.2, 0.7, 0.7])
    # batches of 4: [1,0,1,0] -> pairs (0.9>0.1, 0.9>0.5, 0.4>0.1, 0.4<0.5) = 3/4;
    # [1,1,1,0] -> 0.3>0.2, 0.3>0.2, 0.8>0.2 = 1; [0,0] single class -> 0.5
    assert batch_mean_auc(labels, scores, batch=4) == pytest.approx((0.75 + 1.0 + 0.5) / 3)
    assert batch_mean_auc(labels[:4], scores[:4], batch=4) == pytest.approx(0.75)


def test_evaluate_metrics_by_hand_and_no_mutation(problem):
    from sklearn.metrics import roc_auc_score
    x, y = random_point(problem, seed=5)
    before = tree.clone(x), tree.clone(y)
    metrics = problem.evaluate(x, y)
    assert tree.is_close(x, before[0], rtol=0, atol=0) and tree.is_close(y, before[1], rtol=0, atol=0)
    labels = problem.data.test_labels.numpy()
    with torch.no_grad():
        scores = np.array([float(problem.scores(x, problem.data.test_tokens[i:i + 1])[0]) for i in range(len(labels))])
    assert metrics["test_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics["test_auc"] == pytest.approx(pairwise_auc(labels, scores), abs=1e-9)
    batches = [pairwise_auc(labels[i:i + 32], scores[i:i + 32]) if len(set(labels[i:i + 32])) == 2 else 0.5
               for i in range(0, len(labels), 32)]
    assert len(batches) == 3  # 70 test samples: 32 + 32 + 6
    assert metrics["test_auc_batch_mean"] == pytest.approx(np.mean(batches), abs=1e-9)
    assert metrics["val_loss"] == pytest.approx(float(problem.upper_loss(x, y, None)), rel=1e-12)
    assert metrics["alpha"] == 0.3 and metrics["alpha_star"] == pytest.approx(float(problem.alpha_star(x, None)))


# -- protocol, presets, solver -----------------------------------------------------------------

def test_registered_with_presets_and_finite_sum(rt_path):
    assert PROBLEMS.get("auc").cls is DeepAUC
    assert {"tiny", "paper"} <= set(DeepAUC.PRESETS)
    pb = PROBLEMS.create("auc", data_path=rt_path, **{**DeepAUC.PRESETS["tiny"], "n_train": 100, "n_val": 100,
                                                       "n_test": 100})
    assert pb.n_samples("lower") == 100 and pb.n_samples("upper") == 100
    g = torch.Generator().manual_seed(0)
    batch = pb.sample("upper", g)
    assert batch.dtype == torch.long and batch.shape == (32,) and int(batch.max()) < 100
    x, y = pb.init(g)
    assert set(y) == {"alpha"} and y["alpha"].shape == () and {"a", "b"} <= set(x)
    assert x["a"].dtype == torch.float32
    # the loss on an index batch is the mean of the per-sample losses
    per = torch.stack([pb.upper_loss(x, y, batch[i:i + 1]) for i in range(len(batch))])
    assert float(pb.upper_loss(x, y, batch)) == pytest.approx(float(per.mean()), rel=1e-5)


def test_solver_raises_test_auc(rt_path):
    pb = DeepAUC(data_path=rt_path, **{**DeepAUC.PRESETS["tiny"], "n_train": 150, "n_val": 150, "n_test": 100})
    result = bilevel.solve(pb, "accbo", steps=40, seed=0, eval_every=40, upper_lr=0.05, lower_lr=0.1)
    first, last = result.history[0], result.history[-1]
    assert last["test_auc"] > first["test_auc"] + 0.1, (first, last)
    assert last["test_auc_batch_mean"] > first["test_auc_batch_mean"]


def test_loss_function_is_the_docstring_formula():
    h = torch.tensor([0.9, 0.2, 0.6], dtype=DT)
    labels = torch.tensor([1, 0, 0])
    p, m, a, b, al = 0.25, 0.5, torch.tensor(0.1, dtype=DT), torch.tensor(0.3, dtype=DT), torch.tensor(2.0, dtype=DT)
    # (1-p) (0.8^2)/3 + p (0.1^2 + 0.3^2)/3 + 2 (3) (p (1-p) m + (p 0.8 - (1-p) 0.9)/3) - p (1-p) 4
    expected = (0.75 * 0.64 / 3 + 0.25 * 0.10 / 3 + 6 * (0.1875 * 0.5 + (0.2 - 0.675) / 3) - 0.1875 * 4)
    assert float(auc_margin_loss(h, labels, a, b, al, p, m)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("options, match", [
    (dict(dataset="snli"), "dataset"),
    (dict(positive_ratio=1.5), "positive_ratio"),
    (dict(margin=0.0), "margin"),
    (dict(cell="transformer"), "cell"),
    (dict(layers=3), "layers"),
    (dict(n_train=1000, n_val=1000), "positives"),
    (dict(n_test=600), "n_test"),
    (dict(batch_size=0), "batch_size"),
    (dict(dtype="float16"), "dtype"),
    (dict(positive_ratio=0.01), "both classes"),
])
def test_errors(rt_path, options, match):
    with pytest.raises(ValueError, match=match):
        small(rt_path, **options)


def test_errors_user_files(tmp_path):
    with pytest.raises(ValueError, match="data_path"):
        DeepAUC(dataset="sent140")
    table = write_table(tmp_path / "trec.csv")
    with pytest.raises(ValueError, match="binary"):
        small(str(table), dataset="table", label_column="coarse_label")

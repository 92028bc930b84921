"""Tests of the recurrent HPO problem (one learned L2 weight of an RNN classifier, BO-REP)."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_fixtures import write_amazon, write_rotten_tomatoes, write_table

import bilevel
import bilevel.problems.hpo_recurrent  # noqa: F401  (registers "hpo-rnn")
from bilevel import hypergrad, oracles, tree
from bilevel.problems.corpora import load_corpus
from bilevel.problems.data.text import Vocabulary, tokenize
from bilevel.problems.hpo_recurrent import RecurrentHPO
from bilevel.registry import PROBLEMS

DT = torch.float64


@pytest.fixture(scope="module")
def rt_path(tmp_path_factory):
    return str(write_rotten_tomatoes(tmp_path_factory.mktemp("hpo_rnn") / "rt.csv.bz2", n=400, seed=1))


def small(path, **options):
    """float64, a 3-unit RNN with a 3-unit head over a 20-word vocabulary (122 parameters)."""
    settings = dict(data_path=path, n_train=30, n_val=30, n_test=60, hidden=3, embed_dim=3, fc=3, max_vocab=20,
                    max_len=12, batch_size=8, val_batch_size=8, dtype="float64")
    settings.update(options)
    return RecurrentHPO(**settings)


@pytest.fixture(scope="module")
def problem(rt_path):
    return small(rt_path)


def log_reg(value):
    return {"log_reg": torch.tensor(value, dtype=DT)}


def dense_hessian(fn, v):
    """Reverse-over-reverse Hessian (faster here than torch.func.hessian's forward-over-reverse)."""
    return torch.func.jacrev(torch.func.jacrev(fn))(v)


def solve_lower(problem, x, y_start, iterations=40):
    """y*(x) on the whole training split by damped Newton (dense Hessian), to |grad g| < 1e-12."""
    yf = tree.flatten(y_start).detach().clone()

    def g(v):
        return problem.lower_loss(x, tree.unflatten(v, y_start), None)

    for _ in range(iterations):
        grad = torch.func.grad(g)(yf)
        if float(grad.norm()) < 1e-12:
            return tree.unflatten(yf, y_start)
        step = torch.linalg.solve(dense_hessian(g, yf), grad)
        t, value, decrease = 1.0, g(yf), float(grad @ step)
        while g(yf - t * step) > value - 0.25 * t * decrease and t > 1e-10:
            t /= 2
        yf = yf - t * step
    raise AssertionError(f"Newton did not converge: |grad g| = {float(grad.norm()):.2e}")


# -- the hypergradient -------------------------------------------------------------------------

def test_exact_hypergradient_matches_finite_differences(rt_path):
    problem = small(rt_path, hidden=2, embed_dim=2, fc=2, max_vocab=12)  # 50 parameters: cheap Hessians
    _, y0 = problem.init(torch.Generator().manual_seed(0))
    x = log_reg(-2.0)
    y_star = solve_lower(problem, x, y0)
    # exp(-2) is large enough here: d2_yy g is positive definite at y*(x)
    hessian = dense_hessian(lambda v: problem.lower_loss(x, tree.unflatten(v, y_star), None), tree.flatten(y_star))
    assert float(torch.linalg.eigvalsh(hessian)[0]) > 0.5 * math.exp(-2.0)
    hg, v = hypergrad.exact(problem, x, y_star, None, None)
    # f does not depend on x: grad Phi = -d2_xy g . v = -exp(x) <y*, v>
    assert float(hg["log_reg"]) == pytest.approx(-math.exp(-2.0) * float(tree.dot(y_star, v)), rel=1e-10)

    def phi(value):
        xx = log_reg(value)
        return float(problem.upper_loss(xx, solve_lower(problem, xx, y_star), None))

    eps = 1e-4
    fd = (phi(-2.0 + eps) - phi(-2.0 - eps)) / (2 * eps)
    assert abs(fd) > 1e-6  # Phi is not flat here, so the comparison means something
    assert float(hg["log_reg"]) == pytest.approx(fd, rel=1e-5)
    # away from y*, the implicit formula is not grad Phi
    off, _ = hypergrad.exact(problem, x, y0, None, None)
    assert float(off["log_reg"]) != pytest.approx(fd, rel=1e-2)


def test_hvp_and_cross_forward_matches_reverse(problem):
    x, y = problem.init(torch.Generator().manual_seed(1))
    x = log_reg(-1.0)
    g = torch.Generator().manual_seed(2)
    v = {k: torch.randn(t.shape, generator=g, dtype=DT) for k, t in y.items()}
    batch = torch.tensor([0, 1, 1, 7, 29])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*forward-mode AD failed")
        hv = [oracles.hvp(problem, x, y, v, batch, mode=m) for m in ("reverse", "forward")]
        cr = [oracles.cross(problem, x, y, v, batch, mode=m) for m in ("reverse", "forward")]
    assert tree.relative_error(hv[1], hv[0]) < 1e-12
    assert tree.relative_error(cr[1], cr[0]) < 1e-12
    # cross term by hand: d/dy of d/dx [exp(x)/2 ||y||^2] along v = exp(x) <y, v>
    assert float(cr[0]["log_reg"]) == pytest.approx(math.exp(-1.0) * float(tree.dot(y, v)), rel=1e-12)
    # hvp against finite differences of grad_y g
    eps = 1e-6
    gp = oracles.grad_lower(problem, x, tree.axpy(eps, v, y), batch)[1]
    gm = oracles.grad_lower(problem, x, tree.axpy(-eps, v, y), batch)[1]
    assert tree.relative_error(hv[0], tree.scale(tree.sub(gp, gm), 1 / (2 * eps))) < 1e-7


# -- losses, data, metrics ---------------------------------------------------------------------

def test_losses_by_hand(problem):
    x, y = problem.init(torch.Generator().manual_seed(3))
    x = log_reg(-0.5)
    batch = torch.tensor([2, 2, 11])
    data = problem.data
    ce = np.mean([float(F.cross_entropy(problem.model(y, data.train_tokens[i:i + 1]), data.train_labels[i:i + 1]))
                  for i in batch.tolist()])
    penalty = 0.5 * math.exp(-0.5) * sum(float((t ** 2).sum()) for t in y.values())
    assert float(problem.lower_loss(x, y, batch)) == pytest.approx(ce + penalty, rel=1e-12)
    val = np.mean([float(F.cross_entropy(problem.model(y, data.val_tokens[i:i + 1]), data.val_labels[i:i + 1]))
                   for i in batch.tolist()])
    assert float(problem.upper_loss(x, y, batch)) == pytest.approx(val, rel=1e-12)
    assert float(problem.upper_loss(log_reg(3.0), y, batch)) == float(problem.upper_loss(x, y, batch))


def test_splits_disjoint_and_vocabulary_from_train_only(rt_path):
    pb = small(rt_path, max_vocab=None, n_train=50, n_val=50, n_test=100)
    train, val, test = pb.split_indices
    assert len(set(train) | set(val) | set(test)) == 200
    corpus = load_corpus("rotten-tomatoes", data_path=rt_path)
    assert pb.data.vocab == Vocabulary([tokenize(corpus.inputs[i]) for i in train])
    np.testing.assert_array_equal(pb.data.val_labels.numpy(), corpus.labels[val])
    other = small(rt_path, max_vocab=None, n_train=50, n_val=50, n_test=100, seed=5)
    assert set(other.split_indices[0]) != set(train)


def test_table_with_six_classes_and_amazon(tmp_path):
    table = write_table(tmp_path / "trec.csv")
    pb = small(str(table), dataset="table", label_column="coarse_label", n_train=100, n_val=100, n_test=100)
    x, y = pb.init(torch.Generator())
    assert pb.n_classes == 6 and pb.model(y, pb.data.val_tokens[:4]).shape == (4, 6)
    amazon = write_amazon(tmp_path / "dataset.json")
    pb = small(str(amazon), dataset="amazon", n_train=100, n_val=60, n_test=60)
    assert pb.n_classes == 2


def test_evaluate_metrics_and_no_mutation(problem):
    x, y = problem.init(torch.Generator().manual_seed(4))
    before = tree.clone(x), tree.clone(y)
    metrics = problem.evaluate(x, y)
    assert tree.is_close(x, before[0], rtol=0, atol=0) and tree.is_close(y, before[1], rtol=0, atol=0)
    data = problem.data
    correct = [int(problem.model(y, data.test_tokens[i:i + 1]).argmax()) == int(data.test_labels[i])
               for i in range(problem.n_test)]
    assert metrics["test_accuracy"] == pytest.approx(np.mean(correct), abs=1e-12)
    assert metrics["val_loss"] == pytest.approx(float(problem.upper_loss(x, y, None)), rel=1e-10)
    assert metrics["reg_weight"] == pytest.approx(math.exp(problem.x0)) and metrics["log_reg"] == problem.x0


def test_registered_with_presets_and_finite_sum(rt_path):
    assert PROBLEMS.get("hpo-rnn").cls is RecurrentHPO
    assert {"tiny", "paper"} <= set(RecurrentHPO.PRESETS)
    pb = PROBLEMS.create("hpo-rnn", data_path=rt_path, **{**RecurrentHPO.PRESETS["tiny"], "n_test": 100,
                                                           "n_val": 100})
    assert pb.n_samples("lower") == 200 and pb.n_samples("upper") == 100
    batch = pb.sample("lower", torch.Generator().manual_seed(0))
    assert batch.dtype == torch.long and batch.shape == (32,)
    x, y = pb.init(torch.Generator())
    assert set(x) == {"log_reg"} and x["log_reg"].shape == () and x["log_reg"].dtype == torch.float32


def test_solver_improves_validation_loss(rt_path):
    pb = RecurrentHPO(data_path=rt_path, **{**RecurrentHPO.PRESETS["tiny"], "n_train": 150, "n_val": 100,
                                            "n_test": 100})
    result = bilevel.solve(pb, "soba", steps=40, seed=0, eval_every=40, upper_lr=0.5, lower_lr=0.5, z_lr=0.5)
    first, last = result.history[0], result.history[-1]
    assert last["val_loss"] < first["val_loss"] - 0.05, (first, last)
    assert last["test_accuracy"] > first["test_accuracy"] + 0.1, (first, last)
    assert last["log_reg"] != first["log_reg"]


@pytest.mark.parametrize("options, match", [
    (dict(dataset="snli"), "dataset"),
    (dict(dataset="mnist-5k"), "dataset"),
    (dict(n_train=300, n_val=100), "exceed"),
    (dict(x0=float("nan")), "x0"),
    (dict(cell="lstm2"), "cell"),
    (dict(fc=-1), "fc"),
    (dict(max_vocab=0), "max_vocab"),
    (dict(val_batch_size=0), "val_batch_size"),
    (dict(seed=-1), "seed"),
    (dict(dtype="half"), "dtype"),
])
def test_errors(rt_path, options, match):
    with pytest.raises(ValueError, match=match):
        small(rt_path, **options)

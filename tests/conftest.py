"""Shared fixtures for the solver-core tests: three tiny bilevel problems and dense helpers.

Everything is float64, created with an explicit ``dtype`` (the global default is untouched).
The helpers here (``H``) concatenate and split trees by hand, so that tests of
``bilevel.tree`` and of the oracles never rely on the code they check.

Problems
--------
* :class:`StochasticQuadratic` (fixture ``quad``): closed-form y*(x) and hypergradient.
* :class:`WeightedLogReg` (fixture ``logreg``): non-quadratic, weights sigmoid(x) on the
  lower training losses; checked against finite differences and dense Hessians.
* :class:`MLPProblem` (fixture ``mlp``): y are the parameters of a small nn.Sequential used
  through ``torch.func.functional_call``; x scales and shifts the input features.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilevel.problem import BilevelProblem

DT = torch.float64

# The test problems are tiny: one intra-op thread is faster than two, and far faster when the
# cores are shared (OpenMP spin-waiting made the recurrent-model tests 25x slower under load).
torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# Devices: every test runs on the CPU; a test that takes the ``device`` fixture runs once per
# device present ("cpu", and "cuda" when torch sees one), with that device as the library's
# default (make_problem / solve / bilevel run without device=...).

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """The device this instance of the test runs on."""
    return request.param


@pytest.fixture(autouse=True)
def _default_device(request, monkeypatch):
    """The library's default device is the test's ``device`` (CPU for tests without it), so a
    machine with a GPU runs the rest of the suite exactly as a CPU-only one."""
    import bilevel.device
    target = request.getfixturevalue("device") if "device" in request.fixturenames else "cpu"
    monkeypatch.setattr(bilevel.device, "default_device", lambda: torch.device(target))


# ---------------------------------------------------------------------------------------------
# Hand-written tree helpers (independent of bilevel.tree).

def cat(t, keys=None):
    """Concatenate the leaves of a dict of tensors in the order ``keys`` (default: dict order)."""
    keys = list(t) if keys is None else keys
    return torch.cat([t[k].reshape(-1) for k in keys])


def split(vec, shapes):
    """Inverse of :func:`cat`: ``shapes`` is a dict name -> shape (in order)."""
    out, i = {}, 0
    for k, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        out[k] = vec[i:i + n].reshape(shape)
        i += n
    assert i == vec.numel()
    return out


def shapes_of(t):
    return {k: tuple(v.shape) for k, v in t.items()}


def rel(a, b):
    """Relative error ||a - b|| / ||b|| of two dicts (same keys) or tensors, by hand."""
    if isinstance(a, dict):
        assert set(a) == set(b), (sorted(a), sorted(b))
        keys = list(b)
        a, b = cat(a, keys), cat(b, keys)
    return float((a - b).norm() / b.norm())


def assert_close(a, b, tol, what=""):
    """max-abs difference of two trees (same keys, same shapes) below ``tol`` (absolute)."""
    assert set(a) == set(b), (what, sorted(a), sorted(b))
    for k in b:
        assert a[k].shape == b[k].shape, (what, k, a[k].shape, b[k].shape)
        diff = float((a[k] - b[k]).abs().max()) if b[k].numel() else 0.0
        assert diff <= tol, f"{what}[{k}]: max |diff| = {diff:.3e} > {tol:.1e}"


def dense_second_derivatives(problem, x, y, batch=None):
    """(H_yy, H_xy) of g(x, y; batch) from torch.autograd.functional.hessian on the flattened
    function of z = (x, y). H_xy[i, j] = d2 g / dx_i dy_j, so d2_xy g . v = H_xy @ v."""
    xs, ys = shapes_of(x), shapes_of(y)
    nx = sum(v.numel() for v in x.values())
    z = torch.cat([cat(x), cat(y)]).detach()

    def fn(zz):
        return problem.lower_loss(split(zz[:nx], xs), split(zz[nx:], ys), batch)

    H = torch.autograd.functional.hessian(fn, z)
    return H[nx:, nx:], H[:nx, nx:]


def grad_y_lower(problem, x, y, batch=None):
    """grad_y g by plain torch.autograd.grad (flattened, detached)."""
    yl = {k: v.detach().clone().requires_grad_(True) for k, v in y.items()}
    xd = {k: v.detach() for k, v in x.items()}
    g = torch.autograd.grad(problem.lower_loss(xd, yl, batch), list(yl.values()))
    return torch.cat([t.reshape(-1) for t in g]).detach()


def newton_solve(problem, x, y0, iters=30, batch=None):
    """y*(x) by Newton's method on the flattened lower loss (dense Hessian)."""
    ys = shapes_of(y0)
    xd = {k: v.detach() for k, v in x.items()}
    yf = cat(y0).detach().clone()

    def fn(v):
        return problem.lower_loss(xd, split(v, ys), batch)

    for _ in range(iters):
        g = torch.autograd.functional.jacobian(fn, yf)
        Hm = torch.autograd.functional.hessian(fn, yf)
        yf = yf - torch.linalg.solve(Hm, g)
    g = torch.autograd.functional.jacobian(fn, yf)
    assert float(g.norm()) < 1e-12, float(g.norm())
    return split(yf, ys)


H = types.SimpleNamespace(
    DT=DT, cat=cat, split=split, shapes_of=shapes_of, rel=rel, assert_close=assert_close,
    dense_second_derivatives=dense_second_derivatives, grad_y_lower=grad_y_lower,
    newton_solve=newton_solve,
)


@pytest.fixture(scope="session")
def h():
    """The helper namespace (dense algebra and hand-written tree concatenation)."""
    return H


# ---------------------------------------------------------------------------------------------
# Problem 1: stochastic quadratic with a closed form.

X_SHAPES = {"u": (3,), "s": (1,)}     # dim x = 4
Y_SHAPES = {"w": (4,), "b": (2,)}     # dim y = 6


class StochasticQuadratic(BilevelProblem):
    """Lower  g(x, y; batch) = mean_{i in batch} 1/2 y^T A_i y + x^T C_i y + a_i^T y
       upper  f(x, y; batch) = mean_{j in batch} 1/2 ||y - t_j||^2 + 1/2 x^T B x

    with y = (w, b), x = (u, s) concatenated in that order, A_i = A + N_i N_i^T (SPD), and
    C_i, a_i, t_j small perturbations of C, a, t. ``batch=None`` is the mean over all samples.

    Closed form (batch None; bars are sample means; B symmetric):
        grad_y g = Ab y + Cb^T x + ab = 0      =>  y*(x) = -Ab^{-1} (Cb^T x + ab)
        dy*/dx = -Ab^{-1} Cb^T                    (dim y x dim x)
        Phi(x) = f(x, y*(x)),  grad Phi = grad_x f + (dy*/dx)^T grad_y f
                                        = B x - Cb Ab^{-1} (y*(x) - tb)
    The implicit formula at an arbitrary y (what ``exact`` computes there) is
        grad_x f(x, y) - d2_xy g . (d2_yy g)^{-1} grad_y f(x, y) = B x - Cb Ab^{-1} (y - tb),
    since d2_yy g = Ab and d2_xy g = Cb (as a dim x by dim y matrix) do not depend on (x, y).
    """

    name = "test_quadratic"

    def __init__(self, seed=0, n_lower=7, n_upper=5, batch_size=3, noise=0.3):
        g = torch.Generator().manual_seed(seed)
        dx, dy = 4, 6
        self.dx, self.dy, self.batch_size = dx, dy, batch_size
        self.n_lower, self.n_upper = n_lower, n_upper
        M = torch.randn(dy, dy, generator=g, dtype=DT)
        A = M @ M.T / dy + torch.eye(dy, dtype=DT)
        N = noise * torch.randn(n_lower, dy, dy, generator=g, dtype=DT)
        self.A_i = A + N @ N.transpose(1, 2)
        C = torch.randn(dx, dy, generator=g, dtype=DT)
        self.C_i = C + noise * torch.randn(n_lower, dx, dy, generator=g, dtype=DT)
        a = torch.randn(dy, generator=g, dtype=DT)
        self.a_i = a + noise * torch.randn(n_lower, dy, generator=g, dtype=DT)
        t = torch.randn(dy, generator=g, dtype=DT)
        self.t_j = t + noise * torch.randn(n_upper, dy, generator=g, dtype=DT)
        P = torch.randn(dx, dx, generator=g, dtype=DT)
        self.B = P @ P.T / dx + 0.5 * torch.eye(dx, dtype=DT)
        self._init_gen_seed = seed + 1

    # -- the protocol --------------------------------------------------------------------------
    def lower_loss(self, x, y, batch):
        xf, yf = torch.cat([x["u"], x["s"]]), torch.cat([y["w"], y["b"]])
        idx = slice(None) if batch is None else batch
        A, C, a = self.A_i[idx], self.C_i[idx], self.a_i[idx]
        per = (0.5 * torch.einsum("i,nij,j->n", yf, A, yf)
               + torch.einsum("i,nij,j->n", xf, C, yf) + a @ yf)
        return per.mean()

    def upper_loss(self, x, y, batch):
        xf, yf = torch.cat([x["u"], x["s"]]), torch.cat([y["w"], y["b"]])
        idx = slice(None) if batch is None else batch
        per = 0.5 * ((yf - self.t_j[idx]) ** 2).sum(-1)
        return per.mean() + 0.5 * xf @ self.B @ xf

    def init(self, generator):
        x = torch.randn(self.dx, generator=generator, dtype=DT)
        y = torch.randn(self.dy, generator=generator, dtype=DT)
        return self.x_tree(x), self.y_tree(y)

    def sample(self, level, generator):
        n = {"upper": self.n_upper, "lower": self.n_lower}[level]
        return torch.randint(n, (self.batch_size,), generator=generator)

    # -- dense closed forms used by the tests --------------------------------------------------
    @staticmethod
    def x_tree(vec):
        return split(vec, X_SHAPES)

    @staticmethod
    def y_tree(vec):
        return split(vec, Y_SHAPES)

    @staticmethod
    def x_flat(x):
        return cat(x, list(X_SHAPES))

    @staticmethod
    def y_flat(y):
        return cat(y, list(Y_SHAPES))

    def mats(self, batch=None, upper_batch=None):
        """(Ab, Cb, ab, tb) averaged over the lower batch (and upper batch for tb)."""
        li = slice(None) if batch is None else batch
        ui = slice(None) if upper_batch is None else upper_batch
        return self.A_i[li].mean(0), self.C_i[li].mean(0), self.a_i[li].mean(0), self.t_j[ui].mean(0)

    def grad_y_g(self, xf, yf, batch=None):
        A, C, a, _ = self.mats(batch)
        return A @ yf + C.T @ xf + a

    def y_star(self, xf):
        A, C, a, _ = self.mats()
        return -torch.linalg.solve(A, C.T @ xf + a)

    def implicit_at(self, xf, yf):
        """B x - Cb Ab^{-1} (y - tb): the implicit formula at the given y (flat vectors)."""
        A, C, _, t = self.mats()
        return self.B @ xf - C @ torch.linalg.solve(A, yf - t)

    def true_hypergrad(self, xf):
        return self.implicit_at(xf, self.y_star(xf))

    def phi(self, xf):
        ys = self.y_star(xf)
        return 0.5 * ((ys - self.t_j) ** 2).sum(-1).mean() + 0.5 * xf @ self.B @ xf

    def lipschitz(self):
        return float(torch.linalg.eigvalsh(self.mats()[0]).max())

    def point(self, seed=3, at_solution=True):
        g = torch.Generator().manual_seed(seed)
        xf = torch.randn(self.dx, generator=g, dtype=DT)
        yf = self.y_star(xf) if at_solution else torch.randn(self.dy, generator=g, dtype=DT)
        return self.x_tree(xf), self.y_tree(yf)


@pytest.fixture(scope="session")
def quad():
    return StochasticQuadratic()


# ---------------------------------------------------------------------------------------------
# Problem 2: weighted logistic regression (non-quadratic).

class WeightedLogReg(BilevelProblem):
    """Lower: mean_i sigmoid(x_i) softplus(-l_i (X_i . w + b)) + 0.1 (||w||^2 + b^2)
       upper: mean_j softplus(-l'_j (X'_j . w + b)) + 0.025 ||x||^2
    x = (p, q) are the 8 per-sample weight logits (5 + 3), y = (w, b) the linear model."""

    name = "test_logreg"
    reg = 0.1

    def __init__(self, seed=1, n_train=8, n_val=6, dim=3):
        g = torch.Generator().manual_seed(seed)
        self.Xtr = torch.randn(n_train, dim, generator=g, dtype=DT)
        self.ltr = torch.randint(2, (n_train,), generator=g).to(DT) * 2 - 1
        self.Xval = torch.randn(n_val, dim, generator=g, dtype=DT)
        self.lval = torch.randint(2, (n_val,), generator=g).to(DT) * 2 - 1
        self.dim = dim

    def lower_loss(self, x, y, batch):
        weights = torch.sigmoid(torch.cat([x["p"], x["q"]]))
        margins = self.ltr * (self.Xtr @ y["w"] + y["b"])
        per = weights * F.softplus(-margins)
        idx = slice(None) if batch is None else batch
        return per[idx].mean() + self.reg * ((y["w"] ** 2).sum() + (y["b"] ** 2).sum())

    def upper_loss(self, x, y, batch):
        margins = self.lval * (self.Xval @ y["w"] + y["b"])
        xf = torch.cat([x["p"], x["q"]])
        return F.softplus(-margins).mean() + 0.025 * (xf ** 2).sum()

    def init(self, generator):
        return self.point()

    def point(self, seed=5):
        g = torch.Generator().manual_seed(seed)
        x = {"p": torch.randn(5, generator=g, dtype=DT), "q": torch.randn(3, generator=g, dtype=DT)}
        y = {"w": torch.randn(self.dim, generator=g, dtype=DT), "b": torch.randn(1, generator=g, dtype=DT)}
        return x, y


@pytest.fixture(scope="session")
def logreg():
    return WeightedLogReg()


# ---------------------------------------------------------------------------------------------
# Problem 3: an nn.Module through torch.func.functional_call.

class MLPProblem(BilevelProblem):
    """y: parameters of Linear(3, 4) - Tanh - Linear(4, 2); x: input scale and shift (3 each).
    Lower: cross-entropy on (X * scale + shift) + 0.5 ||y||^2; upper: cross-entropy on a
    validation set fed through the same input transform."""

    name = "test_mlp"

    def __init__(self, seed=2, n=10):
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
        self.shapes = {k: tuple(p.shape) for k, p in self.net.named_parameters()}
        self.X = torch.randn(n, 3, generator=g, dtype=DT)
        self.labels = torch.randint(2, (n,), generator=g)
        self.Xval = torch.randn(n, 3, generator=g, dtype=DT)
        self.lval = torch.randint(2, (n,), generator=g)

    def _logits(self, x, y, inputs):
        return torch.func.functional_call(self.net, y, (inputs * x["scale"] + x["shift"],))

    def lower_loss(self, x, y, batch):
        reg = sum((p ** 2).sum() for p in y.values())
        return F.cross_entropy(self._logits(x, y, self.X), self.labels) + 0.5 * reg

    def upper_loss(self, x, y, batch):
        return F.cross_entropy(self._logits(x, y, self.Xval), self.lval)

    def init(self, generator):
        return self.point()

    def point(self, seed=7):
        g = torch.Generator().manual_seed(seed)
        y = {k: 0.7 * torch.randn(s, generator=g, dtype=DT) for k, s in self.shapes.items()}
        x = {"scale": 1 + 0.3 * torch.randn(3, generator=g, dtype=DT),
             "shift": 0.3 * torch.randn(3, generator=g, dtype=DT)}
        return x, y


@pytest.fixture(scope="session")
def mlp():
    return MLPProblem()


@pytest.fixture(params=["quad", "logreg", "mlp"])
def any_problem(request):
    """Each of the three problems with a point (x, y) away from the lower solution."""
    problem = request.getfixturevalue(request.param)
    x, y = problem.point(at_solution=False) if request.param == "quad" else problem.point()
    return problem, x, y


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """An isolated, offline W&B environment under tmp_path (no credentials, no network)."""
    wandb = pytest.importorskip("wandb")
    dirs = {name: tmp_path / name for name in ("wandb_dir", "wandb_cache", "wandb_config", "wandb_data", "home")}
    for d in dirs.values():
        d.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(dirs["wandb_dir"]))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(dirs["wandb_cache"]))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(dirs["wandb_config"]))
    monkeypatch.setenv("WANDB_DATA_DIR", str(dirs["wandb_data"]))
    monkeypatch.setenv("HOME", str(dirs["home"]))
    monkeypatch.setenv("NETRC", str(dirs["home"] / ".netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    # wandb keeps process-wide settings (WANDB_DIR, ...) from its first use: start afresh
    wandb.teardown()
    yield dirs
    wandb.teardown()


# The hand-computable matrix problem of tests/matrix_problem.py (solver update equations).
@pytest.fixture(scope="module")
def mats():
    from matrix_problem import make_matrices
    return make_matrices()


@pytest.fixture(scope="module")
def problem(mats):
    from matrix_problem import make_problem
    return make_problem(mats)


@pytest.fixture(scope="session")
def data_files(tmp_path_factory):
    """One learnable fixture file per data format (tests/data_fixtures.py, default sizes), by
    corpus name: mnist-5k, rotten-tomatoes, sent140, snli (a directory), amazon, table."""
    from data_fixtures import (write_amazon, write_mnist_5k, write_rotten_tomatoes, write_sent140_leaf,
                               write_snli, write_table)
    d = tmp_path_factory.mktemp("data_files")
    return {"mnist-5k": str(write_mnist_5k(d / "mnist.csv.gz")),
            "rotten-tomatoes": str(write_rotten_tomatoes(d / "rt.csv.bz2")),
            "sent140": str(write_sent140_leaf(d / "sent140.json")),
            "snli": str(write_snli(d / "snli")),
            "amazon": str(write_amazon(d / "dataset.json")),
            "table": str(write_table(d / "trec.csv"))}


@pytest.fixture(scope="session")
def run_files(tmp_path_factory):
    """The data files of the whole-run tests (every solver on every problem, default tiny runs):
    900 Rotten Tomatoes sentences at 70% positives and 20 MNIST images per class, by the keys
    their option templates use, "{rt}" and "{mnist}"."""
    from data_fixtures import write_mnist_5k, write_rotten_tomatoes
    folder = tmp_path_factory.mktemp("run_files")
    return {"rt": str(write_rotten_tomatoes(folder / "rt.csv.bz2", n=900, positive_rate=0.7)),
            "mnist": str(write_mnist_5k(folder / "mnist.csv.gz", n_per_class=20))}


@pytest.fixture
def eager_backend(monkeypatch):
    """torch.compile with dynamo's "eager" backend (the same single graph, without inductor's code
    generation: seconds instead of minutes on 2 cores), the compiled-step caches emptied before
    and after (bilevel.compiled for single runs, bilevel.many_compile for batched ones)."""
    from bilevel import compiled, many_compile
    monkeypatch.setattr(compiled, "BACKEND", "eager")
    compiled.clear_cache()
    many_compile.clear_cache()
    yield
    compiled.clear_cache()
    many_compile.clear_cache()

"""SABA (SAGA memories, bilevel/memory.py) and F2SA: steps against the papers' equations computed
by hand, oracle counts per step, convergence on the benchopt quadratic, and argument errors.

SABA's hand-computed problem is a tiny finite sum of per-sample quadratics (4 lower samples, 3
upper samples, mini-batches of 2, so the upper level has batches of sizes 2 and 1):

    g_i(x, y) = 1/2 y^T A_i y + x^T C_i y + a_i^T y       f_j(x, y) = 1/2 ||y - t_j||^2 + 1/2 x^T B_j x

and a loss on a batch of indices is the mean over them. F2SA's is the deterministic matrix problem
of tests/test_solvers.py.
"""
import math

import pytest
import torch
from omegaconf import OmegaConf

import bilevel
import bilevel.solvers.f2sa  # noqa: F401  (registers "f2sa")
import bilevel.solvers.saba  # noqa: F401  (registers "saba")
import bilevel.solvers.soba  # noqa: F401
from bilevel import count_calls, memory, oracles, tree
from bilevel.memory import Partition
from bilevel.problem import BilevelProblem, FunctionProblem
from bilevel.problems.quadratic import Quadratic
from bilevel.registry import SOLVERS

DIM_Y, DIM_X = 3, 2
F64 = torch.float64


def rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=F64)


class FiniteSum(BilevelProblem):
    """Per-sample quadratics; losses take LongTensor index batches (mean over the indices)."""
    name = "tiny-finite-sum"

    def __init__(self, n_lower=4, n_upper=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        M = rand(g, n_lower, DIM_Y, DIM_Y)
        self.A = M @ M.transpose(1, 2) / DIM_Y + torch.eye(DIM_Y, dtype=F64)
        self.C, self.a = 0.5 * rand(g, n_lower, DIM_X, DIM_Y), rand(g, n_lower, DIM_Y)
        self.t, self.B = rand(g, n_upper, DIM_Y), torch.diag_embed(0.5 + rand(g, n_upper, DIM_X).abs())
        self.x0, self.y0 = rand(g, DIM_X), rand(g, DIM_Y)

    def n_samples(self, level):
        return len(self.A) if level == "lower" else len(self.t)

    def lower_loss(self, x, y, idx):
        y_, x_ = y["y"], x["x"]
        per = 0.5 * torch.einsum("i,nij,j->n", y_, self.A[idx], y_) + torch.einsum("i,nij,j->n", x_, self.C[idx], y_) \
            + self.a[idx] @ y_
        return per.mean()

    def upper_loss(self, x, y, idx):
        per = 0.5 * ((y["y"] - self.t[idx]) ** 2).sum(1) + 0.5 * torch.einsum("i,nij,j->n", x["x"], self.B[idx], x["x"])
        return per.mean()

    def init(self, generator):
        return {"x": self.x0.clone()}, {"y": self.y0.clone()}

    # The directions on a batch, by hand (means of the per-sample matrices).
    def lower_terms(self, idx, x, y, z):
        A, C, a = self.A[idx].mean(0), self.C[idx].mean(0), self.a[idx].mean(0)
        return {"grad_y": A @ y + C.T @ x + a, "hvp": A @ z, "cross": C @ z}

    def upper_terms(self, idx, x, y):
        return {"grad_x": self.B[idx].mean(0) @ x, "grad_y": y - self.t[idx].mean(0)}


def start(problem, name, seed=0, **hp):
    solver = bilevel.make_solver(name, **hp)
    g = torch.Generator().manual_seed(seed)
    return solver, solver.init(problem, *problem.init(g), g)


# ---------------------------------------------------------------------------------------------
# SABA


def test_saba_matches_saga_estimates_by_hand_over_three_iterations():
    """Zero memories; draws j_lower, j_upper reproduced from the run generator (one randint(K)
    each, lower first); estimate K w_j (d_j - M[j]) + sum_k w_k M[k], then M[j] <- d_j."""
    problem, lr_y, lr_z, lr_x, b = FiniteSum(), 0.3, 0.4, 0.2, 2
    solver, state = start(problem, "saba", upper_lr=lr_x, lower_lr=lr_y, z_lr=lr_z, batch_size=b)
    batches = {"lower": [torch.tensor([0, 1]), torch.tensor([2, 3])], "upper": [torch.tensor([0, 1]), torch.tensor([2])]}
    weights = {"lower": [2 / 4, 2 / 4], "upper": [2 / 3, 1 / 3]}
    zero_low = {"grad_y": torch.zeros(DIM_Y, dtype=F64), "hvp": torch.zeros(DIM_Y, dtype=F64), "cross": torch.zeros(DIM_X, dtype=F64)}
    zero_up = {"grad_x": torch.zeros(DIM_X, dtype=F64), "grad_y": torch.zeros(DIM_Y, dtype=F64)}
    table = {"lower": [dict(zero_low), dict(zero_low)], "upper": [dict(zero_up), dict(zero_up)]}

    def saga(level, j, d):
        K, w = len(batches[level]), weights[level]
        hat = {q: K * w[j] * (d[q] - table[level][j][q]) + sum(w[k] * table[level][k][q] for k in range(K)) for q in d}
        table[level][j] = d
        return hat

    draws = torch.Generator().manual_seed(0)
    x, y, z = problem.x0.clone(), problem.y0.clone(), torch.zeros(DIM_Y, dtype=F64)
    seen = {"lower": [], "upper": []}
    for _ in range(3):
        i, j = int(torch.randint(2, (1,), generator=draws)), int(torch.randint(2, (1,), generator=draws))
        seen["lower"].append(i), seen["upper"].append(j)
        low = saga("lower", i, problem.lower_terms(batches["lower"][i], x, y, z))
        up = saga("upper", j, problem.upper_terms(batches["upper"][j], x, y))
        x, y, z = (x - lr_x * (up["grad_x"] - low["cross"]), y - lr_y * low["grad_y"],
                   z - lr_z * (low["hvp"] - up["grad_y"]))
        state = solver.step(problem, state)
        torch.testing.assert_close(state.x["x"], x, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.y["y"], y, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.core.z["y"], z, rtol=0, atol=1e-12)
    # the three iterations revisit a stored entry at both levels (so the update M[j] <- d_j is used)
    assert all(len(set(s)) < 3 for s in seen.values()) and all(len(set(s)) == 2 for s in seen.values()), seen
    for level, keys in (("lower", ("grad_y", "hvp", "cross")), ("upper", ("grad_x", "grad_y"))):
        mem = state.core.memories[level]
        for k in range(2):
            for q in keys:
                key = "x" if q in ("cross", "grad_x") else "y"
                torch.testing.assert_close(mem.table[q][key][k], table[level][k][q], rtol=0, atol=1e-12)
                average = sum(weights[level][kk] * table[level][kk][q] for kk in range(2))
                torch.testing.assert_close(mem.average[q][key], average, rtol=0, atol=1e-12)


def quad(batch_size=None, **kw):
    return Quadratic(**{**dict(n_samples_inner=64, n_samples_outer=64, dim_inner=6, dim_outer=3), **kw},
                     batch_size=batch_size)


def test_saba_with_one_batch_is_soba_full_batch():
    """One mini-batch (batch_size = n): the SAGA estimate is d - M + M = d at every step."""
    problem = quad()
    soba, s1 = start(problem, "soba", upper_lr=0.2, lower_lr=0.3, z_lr=0.4)
    saba, s2 = start(problem, "saba", upper_lr=0.2, lower_lr=0.3, z_lr=0.4, batch_size=64)
    for _ in range(3):
        s1, s2 = soba.step(problem, s1), saba.step(problem, s2)
        for a, b in ((s1.x, s2.x), (s1.y, s2.y), (s1.core.z, s2.core.z)):
            assert tree.is_close(a, b, rtol=1e-10, atol=1e-12)


def test_saba_full_memory_first_step_is_soba_full_batch_step():
    """memory_init="full" on an uneven partition (24, 24, 16): the first estimate is the full-batch
    direction exactly, so the first step is SOBA's full-batch step."""
    problem = quad()
    soba, s1 = start(problem, "soba", upper_lr=0.2, lower_lr=0.3, z_lr=0.4)
    saba, s2 = start(problem, "saba", upper_lr=0.2, lower_lr=0.3, z_lr=0.4, batch_size=24, memory_init="full")
    x0 = s2.x
    s1, s2 = soba.step(problem, s1), saba.step(problem, s2)
    for a, b in ((s1.x, s2.x), (s1.y, s2.y), (s1.core.z, s2.core.z)):
        assert tree.is_close(a, b, rtol=1e-10, atol=1e-12)
    assert not tree.is_close(s2.x, x0)
    # with zero memories the first step is not the full-batch one
    _, s3 = start(problem, "saba", upper_lr=0.2, lower_lr=0.3, z_lr=0.4, batch_size=24)
    assert not tree.is_close(saba.step(problem, s3).x, s1.x, rtol=1e-6)


def test_memory_average_is_full_batch_direction_and_estimate_unbiased():
    """Uneven partition of 64 samples into 24, 24, 16: fresh memories average to the full-batch
    gradient (weights |B_k| / n), and E_j[estimate] is the full-batch gradient for stale memories."""
    problem = quad()
    part = Partition(problem.n_samples("lower"), 24)
    assert part.n_batches == 3 and [part.size(k) for k in range(3)] == [24, 24, 16]
    assert torch.equal(torch.cat([part.batch(k) for k in range(3)]), torch.arange(64))
    x, y = {"x": torch.linspace(-1, 1, 3, dtype=F64)}, {"z": torch.linspace(0, 2, 6, dtype=F64)}
    direction = lambda k: oracles.grad_lower(problem, x, y, part.batch(k))[1]  # noqa: E731
    full = oracles.grad_lower(problem, x, y, None)[1]
    mem = memory.zeros(y, part)
    for k in (2, 0, 1):  # fill in any order: the incremental average stays exact
        mem = memory.update(mem, memory.block(part, k), direction(k))
    assert tree.is_close(mem.average, full, rtol=1e-12, atol=1e-13)
    assert tree.is_close(memory.full([direction(k) for k in range(3)], part).average, full, rtol=1e-12, atol=1e-13)
    stale = memory.full([tree.map(lambda t: t + 0.3 * k + 1.0, direction(k)) for k in range(3)], part)
    mean_estimate = tree.scale(tree.map(lambda *t: sum(t), *[memory.estimate(stale, memory.block(part, j), direction(j))
                                                             for j in range(3)]), 1 / 3)
    assert tree.is_close(mean_estimate, full, rtol=1e-12, atol=1e-13)


def test_memory_update_is_pure():
    part = Partition(5, 2)
    mem = memory.zeros({"w": torch.zeros(2)}, part)
    new = memory.update(mem, memory.block(part, 1), {"w": torch.ones(2)})
    assert torch.equal(mem.table["w"], torch.zeros(3, 2)) and torch.equal(mem.average["w"], torch.zeros(2))
    assert torch.equal(new.table["w"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    assert torch.equal(new.average["w"], torch.full((2,), 2 / 5))


def test_saba_oracle_calls_per_step_and_full_init():
    problem = quad(batch_size=8)
    for memory_init, init_counts in (("zero", dict(grad_upper=0, grad_lower=0, hvp=0, cross=0)),
                                     ("full", dict(grad_upper=3, grad_lower=3, hvp=3, cross=3))):
        solver = bilevel.make_solver("saba", batch_size=24, memory_init=memory_init)  # 3 batches per level
        g = torch.Generator().manual_seed(0)
        x0, y0 = problem.init(g)
        with count_calls() as counts:
            state = solver.init(problem, x0, y0, g)
        assert dict(counts) == init_counts
        state = solver.step(problem, state)
        with count_calls() as counts:
            solver.step(problem, state)
        assert dict(counts) == dict(grad_upper=1, grad_lower=1, hvp=1, cross=1)


def test_saba_reduces_hypergradient_norm_on_quadratic():
    problem = Quadratic(n_samples_inner=256, n_samples_outer=256, dim_inner=10, dim_outer=5, batch_size=None)
    result = bilevel.solve(problem, "saba", steps=300, seed=0, eval_every=300, upper_lr=0.3, lower_lr=0.3, z_lr=0.3,
                           batch_size=32)
    start_, end = result.history[0]["grad_norm_sq"], result.final["grad_norm_sq"]
    assert end < start_ / 100, f"{start_:.3e} -> {end:.3e}"


def test_saba_converges_linearly_where_soba_stalls():
    """seed=4: the value function h is strongly convex (Hessian eigenvalues in [0.099, 1.11]; the
    default seed's h has a negative eigenvalue, so no method can drive ||grad h|| to 0 there).
    SABA with mini-batches of 64 gains >= 1e4 in 800 steps; SOBA with the same step sizes and
    i.i.d. batches of 64 stalls at its noise floor (the control showing the test can fail)."""
    problem = Quadratic(n_samples_inner=256, n_samples_outer=256, dim_inner=10, dim_outer=5, batch_size=64, seed=4)
    hp = dict(upper_lr=0.5, lower_lr=0.5, z_lr=0.5)
    saba = bilevel.solve(problem, "saba", steps=800, eval_every=800, batch_size=64, **hp)
    soba = bilevel.solve(problem, "soba", steps=800, eval_every=800, **hp)
    start_ = saba.history[0]["grad_norm_sq"]
    assert saba.final["grad_norm_sq"] < start_ / 1e4, f"{start_:.3e} -> {saba.final['grad_norm_sq']:.3e}"
    assert soba.final["grad_norm_sq"] > start_ / 1e3


def test_saba_runs_on_hyper_cleaning():
    from bilevel.problems.hyperclean_digits import HypercleanDigits
    problem = HypercleanDigits(n_train=100, n_val=50, n_test=50, batch_size=None, val_batch_size=None)
    assert problem.n_samples("lower") == 100 and problem.n_samples("upper") == 50
    result = bilevel.solve(problem, "saba", steps=5, eval_every=5, batch_size=32, memory_init="full")
    assert tree.all_finite(result.x) and result.state.core.memories["lower"].table["cross"]["weight_logits"].shape == (4, 100)


def test_quadratic_n_samples():
    problem = quad(n_samples_inner=70, n_samples_outer=40)
    assert problem.n_samples("lower") == 70 and problem.n_samples("upper") == 40
    with pytest.raises(ValueError, match="level"):
        problem.n_samples("middle")


def test_saba_needs_a_finite_sum_problem():
    problem = FunctionProblem(upper_loss=lambda x, y, b: (y["w"] ** 2).sum(), lower_loss=lambda x, y, b: (y["w"] ** 2).sum(),
                              x0=torch.zeros(2), y0=torch.zeros(2), name="no-sizes")
    with pytest.raises(TypeError, match=r"'no-sizes'.*n_samples"):
        bilevel.solve(problem, "saba", steps=1)


# ---------------------------------------------------------------------------------------------
# F2SA on the deterministic matrix problem of tests/test_solvers.py


@pytest.fixture(scope="module")
def mats():
    g = torch.Generator().manual_seed(0)
    M = rand(g, 4, 4)
    return dict(A=M @ M.T / 4 + torch.eye(4, dtype=F64), C=0.5 * rand(g, 3, 4), a=rand(g, 4), t=rand(g, 4),
                B=torch.diag(torch.tensor([1.0, 0.5, 0.2], dtype=F64)), x0=rand(g, 3), y0=rand(g, 4))


@pytest.fixture(scope="module")
def matrix_problem(mats):
    m = mats
    return FunctionProblem(
        upper_loss=lambda x, y, b: 0.5 * ((y["y"] - m["t"]) ** 2).sum() + 0.5 * x["x"] @ m["B"] @ x["x"],
        lower_loss=lambda x, y, b: 0.5 * y["y"] @ m["A"] @ y["y"] + x["x"] @ m["C"] @ y["y"] + m["a"] @ y["y"],
        x0={"x": m["x0"]}, y0={"y": m["y0"]})


def test_f2sa_matches_equations_with_schedules(matrix_problem, mats):
    """grad_y g = A y + C^T x + a, grad_x g = C y, grad_y f = y - t, grad_x f = B x; decaying steps
    c / (t+1)^e and lambda_{t+1} = lambda_t + delta / (t+1)^(1/7)."""
    m, K = mats, 3
    hp = dict(upper_lr=0.2, lower_lr=0.3, inner_steps=K, lambda0=1.5, delta_lambda=0.4)
    solver, state = start(matrix_problem, "f2sa", **hp)
    x, y, z, lam = m["x0"].clone(), m["y0"].clone(), m["y0"].clone(), 1.5
    for t in range(2):
        gamma, alpha, xi = 0.3 / (t + 1) ** (4 / 7), 0.3 / (t + 1) ** (5 / 7), 0.2 / (t + 1) ** (4 / 7)
        for _ in range(K):
            z = z - gamma * (m["A"] @ z + m["C"].T @ x + m["a"])
            y = y - alpha * ((y - m["t"]) + lam * (m["A"] @ y + m["C"].T @ x + m["a"]))
        x = x - xi * (m["B"] @ x + lam * (m["C"] @ y - m["C"] @ z))
        lam = lam + 0.4 / (t + 1) ** (1 / 7)
        state = solver.step(matrix_problem, state)
        torch.testing.assert_close(state.x["x"], x, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.y["y"], z, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.core.penalized["y"], y, rtol=0, atol=1e-12)
        assert float(state.core.multiplier) == pytest.approx(lam, rel=1e-15)
        px, py = solver.point(state)  # the evaluated point is (x, lower copy z)
        torch.testing.assert_close(px["x"], x, rtol=0, atol=1e-12)
        torch.testing.assert_close(py["y"], z, rtol=0, atol=1e-12)


def test_f2sa_oracle_calls_per_step():
    problem = quad(batch_size=8)
    solver = bilevel.make_solver("f2sa", inner_steps=3)
    g = torch.Generator().manual_seed(0)
    state = solver.step(problem, solver.init(problem, *problem.init(g), g))
    with count_calls() as counts:
        solver.step(problem, state)
    assert dict(counts) == dict(grad_upper=3 + 1, grad_lower=2 * 3 + 2, hvp=0, cross=0)


def test_f2sa_reduces_hypergradient_norm_on_quadratic():
    """Full batch (with i.i.d. batches of 128 the lambda-amplified noise stalls it near 1e-1).
    Constant step on the lower copy; the penalized copy and x keep their decays."""
    problem = Quadratic(n_samples_inner=256, n_samples_outer=256, dim_inner=10, dim_outer=5, batch_size=None)
    result = bilevel.solve(problem, "f2sa", steps=300, seed=0, eval_every=300, upper_lr=0.5, lower_lr=0.5,
                           inner_steps=5, delta_lambda=0.3, lower_lr_decay=0.0)
    start_, end = result.history[0]["grad_norm_sq"], result.final["grad_norm_sq"]
    assert end < start_ / 100, f"{start_:.3e} -> {end:.3e}"


# ---------------------------------------------------------------------------------------------
# Registration and argument errors


def test_registered_with_papers_and_typed_options():
    for name in ("saba", "f2sa"):
        entry = SOLVERS.get(name)
        assert entry.paper and entry.description
        OmegaConf.structured(entry.cls)
    assert SOLVERS.options("saba") == dict(upper_lr=0.1, lower_lr=0.1, z_lr=0.1, batch_size=64, memory_init="zero")
    options = SOLVERS.options("f2sa")
    assert (options["upper_lr"], options["lower_lr"], options["inner_steps"], options["lambda0"],
            options["delta_lambda"]) == (0.1, 0.1, 10, 1.0, 0.01)


@pytest.mark.parametrize("name, hp, field", [
    ("saba", dict(batch_size=0), "batch_size"),
    ("saba", dict(batch_size=2.5), "batch_size"),
    ("saba", dict(memory_init="random"), "memory_init"),
    ("saba", dict(upper_lr=0.0), "upper_lr"),
    ("saba", dict(z_lr=-1.0), "z_lr"),
    ("f2sa", dict(inner_steps=0), "inner_steps"),
    ("f2sa", dict(lambda0=0.0), "lambda0"),
    ("f2sa", dict(delta_lambda=-0.1), "delta_lambda"),
    ("f2sa", dict(lower_lr_decay=-0.5), "lower_lr_decay"),
    ("f2sa", dict(lambda_decay=math.inf), "lambda_decay"),
    ("f2sa", dict(lower_lr=0.0), "lower_lr"),
])
def test_invalid_hyperparameters_raise_naming_them(name, hp, field):
    with pytest.raises(ValueError, match=field):
        bilevel.make_solver(name, **hp)


def test_partition_validates():
    with pytest.raises(ValueError, match="batch_size"):
        Partition(10, 0)
    with pytest.raises(ValueError, match="n"):
        Partition(0, 4)


@pytest.mark.parametrize("name", ["saba", "f2sa"])
def test_state_holds_everything_to_continue(name, tmp_path):
    """3 steps, torch.save / torch.load of the state, 3 more steps == 6 steps in one run (the SAGA
    memories, lambda and both lower copies live in the state)."""
    problem, hp = quad(batch_size=8), (dict(inner_steps=2) if name == "f2sa" else dict(batch_size=16))
    torch.save(bilevel.solve(problem, name, steps=3, seed=1, **hp).state, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    resumed = bilevel.solve(problem, name, steps=3, state=state, **hp)
    whole = bilevel.solve(problem, name, steps=6, seed=1, **hp)
    assert tree.is_close(resumed.x, whole.x, rtol=0, atol=0) and tree.is_close(resumed.y, whole.y, rtol=0, atol=0)

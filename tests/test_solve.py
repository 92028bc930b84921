"""The outer loop :func:`bilevel.solve`: results, counts, errors, callbacks, determinism, resume.

Everything runs on CPU in float64 on tiny problems; nothing is written outside ``tmp_path``.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from bilevel import Callback, FunctionProblem, NonFiniteError, Result, make_problem, solve
from bilevel import load_checkpoint, make_solver
from bilevel.checkpoint import save_checkpoint
from bilevel.problem import BilevelProblem, ProblemError
from bilevel.registry import SOLVERS
from bilevel.schedules import PolyDecay

DT = torch.float64
A = torch.tensor([1.0, 2.0, 3.0], dtype=DT)      # lower curvature
T = torch.tensor([0.5, -1.0, 2.0], dtype=DT)     # upper target
LAM = 0.1                                          # upper ridge on x

ORACLE_KINDS = ("grad_upper", "grad_lower", "hvp", "cross")


def _upper(x, y, batch):
    return 0.5 * ((y["w"] - T) ** 2).sum() + 0.5 * LAM * (x["l"] ** 2).sum()


def _lower(x, y, batch):
    # g = 1/2 sum a_i w_i^2 - <l, w>   =>   y*(x) = l / a
    return 0.5 * (A * y["w"] ** 2).sum() - (x["l"] * y["w"]).sum()


def _evaluate(x, y):
    l, w = x["l"], y["w"]
    y_star = l / A
    grad = (y_star - T) / A + LAM * l          # grad Phi(l) by hand
    return {"hypergrad_sq": float(grad @ grad), "inner_distance": float(((w - y_star) ** 2).sum()),
            "x0": float(l[0])}


def tiny_problem(name="tiny-quadratic"):
    """Deterministic quadratic bilevel problem with a closed-form hypergradient."""
    return FunctionProblem(_upper, _lower, x0={"l": torch.ones(3, dtype=DT)}, y0={"w": torch.zeros(3, dtype=DT)},
                           evaluate=_evaluate, name=name)


def small_quadratic(**options):
    """The registered stochastic quadratic, shrunk (4 blocks of 16 samples per level)."""
    opts = dict(dim_inner=5, dim_outer=3, n_samples_inner=64, n_samples_outer=64, batch_size=16)
    opts.update(options)
    return make_problem("quadratic", **opts)


@pytest.fixture(scope="module")
def squad():
    return small_quadratic()


def metrics_only(history):
    """The records without wall-clock time (the only non-deterministic field)."""
    return [{k: v for k, v in r.items() if k != "time"} for r in history]


class Recorder(Callback):
    """Keeps every hook call; the eval records are also deep-copied when received."""

    def __init__(self):
        self.events, self.infos, self.steps = [], [], []
        self.records, self.snapshots = [], []
        self.results, self.errors = [], []

    def on_start(self, info):
        self.events.append("start")
        self.infos.append(info)

    def on_step(self, iteration):
        self.events.append("step")
        self.steps.append(iteration)

    def on_eval(self, record):
        self.events.append("eval")
        self.records.append(record)
        self.snapshots.append(copy.deepcopy(record))

    def on_end(self, result):
        self.events.append("end")
        self.results.append(result)

    def on_error(self, error):
        self.events.append("error")
        self.errors.append(error)


# ---------------------------------------------------------------------------------------------
# Result fields


def test_solve_by_name_result_fields():
    rec = Recorder()
    result = solve(tiny_problem(), "soba", steps=20, seed=0, eval_every=5, upper_lr=0.05, callbacks=[rec])
    assert isinstance(result, Result)
    assert [r["iteration"] for r in result.history] == [0, 5, 10, 15, 20]
    assert result.iterations == 20
    assert result.wall_time > 0
    assert result.solver == "soba"
    assert result.problem == "tiny-quadratic"
    benchopt = PolyDecay(0.1, 0.5)  # SOBA's default lower and z steps, 0.1 / sqrt(t + 1)
    assert result.hyperparameters == {"upper_lr": 0.05, "lower_lr": benchopt, "z_lr": benchopt}
    # SOBA: one upper gradient, one lower gradient, one HVP and one cross product per iteration
    assert dict(result.counts) == {k: 20 for k in ORACLE_KINDS}
    last = result.history[-1]
    assert {k: last[f"calls/{k}"] for k in ORACLE_KINDS} == dict(result.counts)
    assert last["calls/total"] == result.counts.total == sum(result.counts.values()) == 80
    for record in result.history:
        assert record["calls/total"] == sum(record[f"calls/{k}"] for k in ORACLE_KINDS)
        assert record["calls/total"] == 4 * record["iteration"]
    times = [r["time"] for r in result.history]
    assert times == sorted(times) and times[-1] <= result.wall_time + 1e-12
    # the returned point is the final iterate and the final record is evaluated there
    assert torch.equal(result.x["l"], result.state.x["l"])
    assert torch.equal(result.y["w"], result.state.y["w"])
    assert result.state.iteration == 20
    assert result.final == last
    assert last["x0"] == pytest.approx(float(result.x["l"][0]), abs=0, rel=0)
    assert result.metric("hypergrad_sq") == [r["hypergrad_sq"] for r in result.history]
    # it actually optimizes
    assert result.final["hypergrad_sq"] < result.history[0]["hypergrad_sq"]
    assert result.final["inner_distance"] < result.history[0]["inner_distance"]
    # callbacks saw exactly the run
    assert rec.events[0] == "start" and rec.events[-1] == "end" and "error" not in rec.events
    assert rec.steps == list(range(1, 21))
    assert rec.records == result.history
    assert rec.results == [result]
    assert rec.infos == [{"problem": "tiny-quadratic", "solver": "soba", "steps": 20, "seed": 0,
                          "hyperparameters": {"upper_lr": 0.05, "lower_lr": benchopt, "z_lr": benchopt}}]


def test_solve_with_instance_and_overrides():
    solver_cls = SOLVERS.get("soba").cls
    instance = solver_cls(upper_lr=0.05, z_lr=0.2)
    result = solve(tiny_problem(), instance, steps=12, eval_every=4, lower_lr=0.3)
    assert result.hyperparameters == {"upper_lr": 0.05, "lower_lr": 0.3, "z_lr": 0.2}
    assert instance.lower_lr == PolyDecay(0.1, 0.5), "the caller's solver instance must not be modified"
    assert result.solver == "soba"
    assert [r["iteration"] for r in result.history] == [0, 4, 8, 12]
    # same hyperparameters by name give the same run
    by_name = solve(tiny_problem(), "soba", steps=12, eval_every=4, upper_lr=0.05, lower_lr=0.3, z_lr=0.2)
    assert metrics_only(by_name.history) == metrics_only(result.history)
    assert torch.equal(by_name.x["l"], result.x["l"])


def test_last_step_always_evaluated_and_default_eval_every():
    result = solve(tiny_problem(), "soba", steps=7, eval_every=3)
    assert [r["iteration"] for r in result.history] == [0, 3, 6, 7]
    result = solve(tiny_problem(), "lower-only", steps=40)       # default: about 20 evaluations
    assert [r["iteration"] for r in result.history] == list(range(0, 41, 2))
    assert dict(result.counts) == {"grad_upper": 0, "grad_lower": 40, "hvp": 0, "cross": 0}
    assert torch.equal(result.x["l"], torch.ones(3, dtype=DT)), "lower-only must not move x"


def test_zero_steps_evaluates_initial_point_only():
    result = solve(tiny_problem(), "soba", steps=0)
    assert [r["iteration"] for r in result.history] == [0]
    assert result.iterations == 0
    assert result.counts.total == 0
    assert torch.equal(result.x["l"], torch.ones(3, dtype=DT))


# ---------------------------------------------------------------------------------------------
# Argument errors


def test_unknown_solver_name_lists_valid_names():
    with pytest.raises(KeyError) as info:
        solve(tiny_problem(), "sobaa", steps=1)
    message = str(info.value)
    assert "sobaa" in message and "valid" in message
    for name in SOLVERS.names():
        assert name in message


def test_unknown_hyperparameter_names_it_and_lists_valid():
    with pytest.raises(TypeError) as info:
        solve(tiny_problem(), "soba", steps=1, upper_lrr=0.1)
    message = str(info.value)
    assert "upper_lrr" in message and "valid" in message
    for option in ("upper_lr", "lower_lr", "z_lr"):
        assert option in message
    with pytest.raises(TypeError, match="upper_lrr"):
        solve(tiny_problem(), SOLVERS.get("soba").cls(), steps=1, upper_lrr=0.1)


def test_solver_of_wrong_type():
    with pytest.raises(TypeError, match="Solver"):
        solve(tiny_problem(), 42, steps=1)


@pytest.mark.parametrize("steps", [-1, -10, 2.5])
def test_bad_steps(steps):
    rec = Recorder()
    with pytest.raises(ValueError, match="steps"):
        solve(tiny_problem(), "soba", steps=steps, callbacks=[rec])
    assert rec.events == []


# ---------------------------------------------------------------------------------------------
# Divergence


def test_non_finite_error_reports_iteration_and_keeps_records():
    rec = Recorder()
    with pytest.raises(NonFiniteError) as info:
        solve(tiny_problem(), "soba", steps=50, eval_every=1, upper_lr=1e200, callbacks=[rec])
    error = info.value
    assert isinstance(error, FloatingPointError)
    failing_iteration = (rec.steps[-1] if rec.steps else 0) + 1
    assert failing_iteration < 50
    assert f"iteration {failing_iteration}" in str(error)
    assert "soba" in str(error) and "tiny-quadratic" in str(error)
    # on_error, not on_end, with that very error
    assert "end" not in rec.events and rec.results == []
    assert rec.events[-1] == "error" and rec.errors == [error]
    # every record handed out before the failure is intact and finite
    assert [r["iteration"] for r in rec.records] == list(range(failing_iteration))
    assert rec.records == rec.snapshots
    assert all(math.isfinite(r["calls/total"]) and r["time"] >= 0 for r in rec.records)


def test_error_in_a_callback_reaches_on_error_of_all_callbacks():
    class Boom(Callback):
        def on_eval(self, record):
            if record["iteration"] == 4:
                raise RuntimeError("boom")

    rec = Recorder()
    with pytest.raises(RuntimeError, match="boom"):
        solve(tiny_problem(), "soba", steps=10, eval_every=2, callbacks=[rec, Boom()])
    assert rec.events[-1] == "error" and "end" not in rec.events
    assert [r["iteration"] for r in rec.records] == [0, 2, 4]


# ---------------------------------------------------------------------------------------------
# Determinism and resume


def test_same_seed_same_history_different_seed_different(squad):
    a = solve(squad, "soba", steps=15, seed=3, eval_every=5)
    b = solve(squad, "soba", steps=15, seed=3, eval_every=5)
    c = solve(squad, "soba", steps=15, seed=4, eval_every=5)
    assert metrics_only(a.history) == metrics_only(b.history)
    assert torch.equal(a.x["x"], b.x["x"]) and torch.equal(a.y["z"], b.y["z"])
    assert a.history[0] == {**c.history[0], "time": a.history[0]["time"]}  # same deterministic start
    assert a.final["grad_norm_sq"] != c.final["grad_norm_sq"]
    assert not torch.equal(a.x["x"], c.x["x"])


@pytest.mark.parametrize("solver", ["soba", "aid-cg"])
def test_resume_equals_single_run(squad, solver):
    opts = {"inner_steps": 2, "cg_steps": 2} if solver == "aid-cg" else {}
    full = solve(squad, solver, steps=20, seed=1, eval_every=5, **opts)
    first = solve(squad, solver, steps=10, seed=1, eval_every=5, **opts)
    second = solve(squad, solver, steps=10, seed=999, eval_every=5, state=first.state, **opts)
    assert [r["iteration"] for r in second.history] == [10, 15, 20]
    assert second.iterations == 10
    assert second.state.iteration == 20
    assert torch.equal(second.x["x"], full.x["x"])
    assert torch.equal(second.y["z"], full.y["z"])
    metric_keys = ("grad_norm_sq", "inner_distance", "value")
    by_iter = {r["iteration"]: r for r in full.history}
    for record in second.history:
        assert {k: record[k] for k in metric_keys} == {k: by_iter[record["iteration"]][k] for k in metric_keys}


def test_resume_from_checkpoint_file(squad, tmp_path):
    full = solve(squad, "soba", steps=20, seed=2, eval_every=10)
    first = solve(squad, "soba", steps=10, seed=2, eval_every=10)
    path = tmp_path / "soba.state.pt"
    save_checkpoint(path, first.state, solver=make_solver("soba"), problem=squad)
    assert path.stat().st_size > 0
    loaded = load_checkpoint(path).state
    assert loaded.iteration == 10
    assert torch.equal(loaded.x["x"], first.state.x["x"])
    assert torch.equal(loaded.generator.get_state(), first.state.generator.get_state())
    resumed = solve(squad, "soba", steps=10, state=loaded, eval_every=10)
    assert torch.equal(resumed.x["x"], full.x["x"])
    assert torch.equal(resumed.y["z"], full.y["z"])
    assert resumed.final["grad_norm_sq"] == full.final["grad_norm_sq"]


def test_resuming_twice_from_the_same_state_gives_the_same_run(squad):
    """A Result's state is a checkpoint: continuing from it must not consume it."""
    first = solve(squad, "soba", steps=5, seed=0, eval_every=5)
    generator_state = first.state.generator.get_state().clone()
    a = solve(squad, "soba", steps=5, state=first.state, eval_every=5)
    assert torch.equal(first.state.generator.get_state(), generator_state), \
        "solve(state=...) advanced the generator stored in the caller's state"
    b = solve(squad, "soba", steps=5, state=first.state, eval_every=5)
    assert torch.equal(a.x["x"], b.x["x"])


# ---------------------------------------------------------------------------------------------
# Problem validation


class ListInit(BilevelProblem):
    name = "list-init"

    def upper_loss(self, x, y, batch):
        return (y["w"] ** 2).sum()

    def lower_loss(self, x, y, batch):
        return (y["w"] ** 2).sum()

    def init(self, generator):
        return [torch.zeros(2, dtype=DT)], {"w": torch.zeros(2, dtype=DT)}


def _problem(kind):
    x0, y0 = {"l": torch.ones(3, dtype=DT)}, {"w": torch.zeros(3, dtype=DT)}
    if kind == "init-not-dict":
        return ListInit(), ("list-init", "init()")
    if kind == "vector-lower":
        return FunctionProblem(_upper, lambda x, y, b: (y["w"] - x["l"]) ** 2, x0, y0, name="vec-lower"), \
            ("vec-lower", "lower_loss", "0-d")
    if kind == "vector-upper":
        return FunctionProblem(lambda x, y, b: y["w"] * 2, _lower, x0, y0, name="vec-upper"), \
            ("vec-upper", "upper_loss", "0-d")
    if kind == "integer-x":
        return FunctionProblem(_upper, _lower, {"l": torch.ones(3, dtype=torch.int64)}, y0, name="int-x"), \
            ("int-x", "floating point")
    if kind == "raising-lower":
        def bad(x, y, b):
            raise IndexError("oops")
        return FunctionProblem(_upper, bad, x0, y0, name="raiser"), ("raiser", "lower_loss", "IndexError", "oops")
    if kind == "nan-upper":
        return FunctionProblem(lambda x, y, b: y["w"].sum() * float("nan"), _lower, x0, y0, name="nan-up"), \
            ("nan-up", "upper_loss", "nan")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["init-not-dict", "vector-lower", "vector-upper", "integer-x", "raising-lower",
                                  "nan-upper"])
def test_problem_validation(kind):
    problem, fragments = _problem(kind)
    rec = Recorder()
    with pytest.raises(ProblemError) as info:
        solve(problem, "soba", steps=3, callbacks=[rec])
    for fragment in fragments:
        assert fragment in str(info.value)
    assert rec.events == [], "no callback may run for an invalid problem"


def test_resumed_records_continue_counts_and_time():
    problem = make_problem("quadratic", dim_inner=5, dim_outer=3, n_samples_inner=64, n_samples_outer=64)
    whole = solve(problem, "soba", 20, eval_every=10)
    first = solve(problem, "soba", 10, eval_every=10)
    second = solve(problem, "soba", 10, eval_every=10, state=first.state)
    assert second.history[0]["calls/total"] == first.final["calls/total"]
    assert second.final["calls/total"] == whole.final["calls/total"]
    assert second.final["iteration"] == 20
    assert second.history[0]["time"] == pytest.approx(first.final["time"])
    assert second.final["time"] > second.history[0]["time"]
    assert second.counts.total == first.counts.total  # Result.counts: this call only

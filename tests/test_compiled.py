"""Compiled solver steps (bilevel.compiled, ``solve(..., compile=True)``, ``compile=true``).

Most tests trace with dynamo's "eager" backend (the same single graph, double backward included,
without inductor's code generation: seconds instead of tens of seconds on 2 cores); one slow
test runs inductor itself.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import bilevel
from bilevel import compiled, make_problem, make_solver
from bilevel.compiled import CompileFallback, compiled_step
from bilevel.config import load


@pytest.fixture(scope="module")
def quad():
    return make_problem("quadratic", preset="tiny", dtype="float64")


def _state_leaves(state):
    """Every tensor of a run record's typed state, in a fixed order."""
    out = []

    def walk(node):
        if isinstance(node, torch.Tensor):
            out.append(node)
        elif isinstance(node, dict):
            for k in sorted(node):
                walk(node[k])
        elif isinstance(node, (tuple, list)):
            for v in node:
                walk(v)
    walk(tuple(state.core))
    return out


def _assert_same_run(eager, comp, rtol):
    assert comp.state.iteration == eager.state.iteration
    a, b = _state_leaves(eager.state), _state_leaves(comp.state)
    assert len(a) == len(b) and len(a) > 0
    for u, v in zip(a, b):
        torch.testing.assert_close(v, u, rtol=rtol, atol=rtol)
    assert dict(comp.counts) == dict(eager.counts)  # oracle calls inside the graph are counted
    assert [r["iteration"] for r in comp.history] == [r["iteration"] for r in eager.history]
    assert torch.equal(comp.state.generator.get_state(), eager.state.generator.get_state())


@pytest.mark.parametrize("solver, options", [
    ("soba", {}),  # schedules 0.1 / sqrt(t + 1) on every step size
    ("stocbio", dict(inner_steps=2, neumann_steps=2, neumann_lr=0.1)),  # composed: lower loop, Neumann, SGD
    ("amigo", dict(inner_steps=2, linear_steps=2, z_lr=0.1)),
])
def test_compiled_steps_equal_eager_steps(quad, eager_backend, solver, options):
    eager = bilevel.solve(quad, solver, 6, seed=3, eval_every=2, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallback)  # it must compile, not fall back
        comp = bilevel.solve(quad, solver, 6, seed=3, eval_every=2, compile=True, **options)
    _assert_same_run(eager, comp, rtol=1e-12)
    step = compiled_step(make_solver(solver, **options), quad)
    assert step.reason is None
    # the iteration and the schedules' t change every step: one graph for the first compiled
    # step, one with the ints made dynamic, none after
    assert 1 <= step.compiles <= 2


def test_compiled_run_continues_a_second_seed_without_compiling(quad, eager_backend):
    bilevel.solve(quad, "soba", 4, seed=0, compile=True)
    step = compiled_step(make_solver("soba"), quad)
    compiles = step.compiles
    eager = bilevel.solve(quad, "soba", 5, seed=1)
    comp = bilevel.solve(quad, "soba", 5, seed=1, compile=True)
    _assert_same_run(eager, comp, rtol=1e-12)
    assert step.compiles == compiles


class _BranchyQuadratic(type(make_problem("quadratic", preset="tiny"))):
    """The tiny quadratic whose lower loss reads a tensor into Python (data-dependent control flow)."""

    def lower_loss(self, x, y, batch):
        loss = super().lower_loss(x, y, batch)
        if float(loss.detach()) > 1e12:  # a host read: not traceable in one graph
            raise FloatingPointError("lower loss exploded")
        return loss


def test_untraceable_problem_falls_back_with_one_warning(eager_backend):
    problem = _BranchyQuadratic(**make_problem("quadratic").PRESETS["tiny"], dtype="float64")
    eager = bilevel.solve(problem, "soba", 5, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        comp = bilevel.solve(problem, "soba", 5, seed=0, compile=True)
    fallbacks = [w for w in caught if issubclass(w.category, CompileFallback)]
    assert len(fallbacks) == 1, [str(w.message) for w in fallbacks]
    message = str(fallbacks[0].message)
    assert "soba" in message and "runs eagerly" in message
    assert "data-dependent" in message and "in lower_loss: if float(loss.detach()) > 1e12" in message
    _assert_same_run(eager, comp, rtol=0)  # eager from the failed step on: bit for bit


class _LoggingQuadratic(type(make_problem("quadratic", preset="tiny"))):
    """The tiny quadratic writing a line to a text log at each upper loss (a Python side effect
    on a C-implemented object, which dynamo does not trace)."""

    def upper_loss(self, x, y, batch):
        self.log.write("upper loss\n")
        return super().upper_loss(x, y, batch)


def test_problem_with_a_side_effect_falls_back_with_one_warning(eager_backend):
    import io
    problem = _LoggingQuadratic(**make_problem("quadratic").PRESETS["tiny"], dtype="float64")
    problem.log = io.StringIO()
    eager = bilevel.solve(problem, "soba", 4, seed=0)
    lines = problem.log.getvalue().count("\n")
    with pytest.warns(CompileFallback, match="runs eagerly.*in upper_loss: self.log.write") as caught:
        comp = bilevel.solve(problem, "soba", 4, seed=0, compile=True)
    assert len([w for w in caught if issubclass(w.category, CompileFallback)]) == 1
    _assert_same_run(eager, comp, rtol=0)
    assert problem.log.getvalue().count("\n") == 2 * lines  # every eager step logged once, none twice


def test_genuine_errors_still_raise_in_compiled_mode(eager_backend):
    class Broken(type(make_problem("quadratic", preset="tiny"))):
        def upper_loss(self, x, y, batch):
            return super().upper_loss(x, y, batch) * torch.ones(2)  # not a scalar

    problem = Broken(**make_problem("quadratic").PRESETS["tiny"], dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompileFallback)
        with pytest.raises(ValueError, match="upper_loss must return a 0-d tensor"):
            bilevel.solve(problem, "soba", 3, compile=True)


def test_compile_must_be_a_bool(quad):
    with pytest.raises(TypeError, match="compile must be True or False, got 'yes'"):
        bilevel.solve(quad, "soba", 1, compile="yes")


def test_recompile_limit_is_checked(quad):
    for bad in (0, 8, True, 2.0):
        with pytest.raises(ValueError, match=f"recompile_limit must be an integer from 1 to 7.*got {bad!r}"):
            compiled.CompiledStep(make_solver("soba"), quad, recompile_limit=bad)


def test_config_and_command_line_key(tmp_path, monkeypatch):
    from bilevel import cli, experiment
    assert load(None, []).compile is False
    assert load(None, ["compile=true"]).compile is True
    seen = []
    real_solve = experiment.solve

    def spy(*args, compile=False, **kwargs):
        seen.append(compile)
        return real_solve(*args, **kwargs)  # the run itself eagerly: this test checks the plumbing
    monkeypatch.setattr(experiment, "solve", spy)
    code = cli.main(["run", "problem=quadratic", "preset=tiny", "solver=soba", "steps=2", "eval_every=1",
                     "progress=false", "plot=false", f"output_dir={tmp_path}", "compile=true"])
    assert code in (0, None) and seen == [True]


@pytest.mark.slow
def test_inductor_compiled_soba_equals_eager(quad):
    compiled.clear_cache()
    eager = bilevel.solve(quad, "soba", 5, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallback)
        comp = bilevel.solve(quad, "soba", 5, seed=2, compile=True)
    _assert_same_run(eager, comp, rtol=1e-10)  # fused kernels reorder float64 sums


def test_recompiles_past_the_limit_fall_back_to_eager(quad):
    # SOBA compiles one graph with the iteration as a constant, then one with it dynamic: a
    # limit of one graph per run is exceeded at the third step and the run goes on eagerly
    from bilevel.sampling import run_generator
    torch._dynamo.reset()  # forget the ints other tests' runs made dynamic (kept per code location)
    solver = make_solver("soba")

    def start():
        generator = run_generator(5)
        x, y = quad.init(generator)
        return solver.init(quad, x, y, generator)
    eager, state = start(), start()
    step = compiled.CompiledStep(solver, quad, recompile_limit=1, backend="eager")
    with pytest.warns(CompileFallback, match="compiled 2 graphs in this run, more than recompile_limit=1; "
                      "the newest graph's failed guard: 0/0: batches.t == ") as caught:
        for _ in range(5):
            eager, state = solver.step(quad, eager), step(state)
    assert len([w for w in caught if issubclass(w.category, CompileFallback)]) == 1
    assert step.compiles == 2 and step.reason is not None
    for u, v in zip(_state_leaves(eager), _state_leaves(state)):
        torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-12)

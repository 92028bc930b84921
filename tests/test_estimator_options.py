"""Estimator options reachable from the solvers that use those estimators (issue 10 section 2):
CG's tolerance (aid-cg ``cg_tol``; its ``cg_negative_curvature`` already was) and linear-system
SGD's projection radius (amigo's and bo-rep/slip's ``z_radius``), as solver fields, config keys
and ``solver.KEY=`` on the command line, each validated with an error naming the field."""
from __future__ import annotations

import pytest

import bilevel
from bilevel import count_calls, make_problem, make_solver, tree
from bilevel.config import ConfigError, build_solver, load
from bilevel.sampling import run_generator


@pytest.fixture(scope="module")
def quad():
    return make_problem("quadratic", preset="tiny", dtype="float64")


def _started(problem, name, **options):
    solver = make_solver(name, **options)
    generator = run_generator(0)
    x, y = problem.init(generator)
    return solver, solver.init(problem, x, y, generator)


def test_aid_cg_tol_reaches_cg_and_stops_it_early(quad):
    """cg_tol=0.5: CG stops once ||r|| <= 0.5 ||b||, after fewer products than with the default
    tol 0 (which runs to machine precision: about dim(y) = 5 products here; same seed and state)."""
    assert make_solver("aid-cg", cg_tol=1e-6).estimator().tol == 1e-6
    hvps = {}
    for tol in (0.0, 0.5):
        solver, state = _started(quad, "aid-cg", cg_steps=20, cg_tol=tol, warm_start_v=False)
        with count_calls() as counts:
            solver.step(quad, state)
        hvps[tol] = counts["hvp"]
    assert hvps[0.5] < hvps[0.0] <= 20, hvps


def test_amigo_z_radius_reaches_linear_sgd_and_projects_z(quad):
    """z_radius=1e-3: every z step is projected, ||z|| <= 1e-3 after each iteration; without it
    z grows past it (the control)."""
    assert make_solver("amigo", z_radius=2.0).estimator().radius == 2.0
    for radius in (None, 1e-3):
        solver, state = _started(quad, "amigo", z_radius=radius, inner_steps=2, linear_steps=2, z_lr=0.1)
        for _ in range(3):
            state = solver.step(quad, state)
        z_norm = float(tree.norm(state.core.estimator))
        if radius is None:
            assert z_norm > 1e-2
        else:
            assert z_norm <= radius * (1 + 1e-12)


@pytest.mark.parametrize("name", ["bo-rep", "slip"])
def test_normalized_momentum_z_radius_reaches_linear_sgd(quad, name):
    solver, state = _started(quad, name, hypergradient="linear_sgd", z_lr=0.1, z_radius=1e-4)
    assert solver.estimator().radius == 1e-4
    for _ in range(2):
        state = solver.step(quad, state)
    assert float(tree.norm(state.core.estimator)) <= 1e-4 * (1 + 1e-12)


@pytest.mark.parametrize("name, options, field", [
    ("aid-cg", dict(cg_tol=-1e-3), "cg_tol"),
    ("aid-cg", dict(cg_tol=float("nan")), "cg_tol"),
    ("aid-cg", dict(cg_tol="small"), "cg_tol"),
    ("amigo", dict(z_radius=0.0), "z_radius"),
    ("amigo", dict(z_radius=-2.0), "z_radius"),
    ("bo-rep", dict(hypergradient="linear_sgd", z_radius=float("inf")), "z_radius"),
    ("slip", dict(z_radius=1.0), "z_radius"),  # the Neumann hypergradient has no z to project
])
def test_bad_values_name_the_field(name, options, field):
    with pytest.raises(ValueError, match=field):
        make_solver(name, **options)


def test_config_and_command_line_reach_the_estimator():
    cfg = load(None, ["problem=quadratic", "preset=tiny", "solver=aid-cg", "solver.cg_tol=1e-6",
                      "solver.cg_negative_curvature=raise"])
    estimator = build_solver(cfg, "aid-cg").estimator()
    assert estimator.tol == 1e-6 and estimator.negative_curvature == "raise"
    cfg = load(None, ["problem=quadratic", "preset=tiny", "solvers=[amigo]", "solver_options.amigo.z_radius=3.0"])
    assert build_solver(cfg, "amigo").estimator().radius == 3.0
    with pytest.raises(ConfigError, match="cg_tol"):
        build_solver(load(None, ["problem=quadratic", "preset=tiny", "solver=aid-cg", "solver.cg_tol=-1.0"]), "aid-cg")
    with pytest.raises(ConfigError, match="solver=NAME"):
        load(None, ["problem=quadratic", "solver.cg_tol=1e-6"])


def test_solve_passes_the_options(quad):
    result = bilevel.solve(quad, "amigo", 2, seed=0, z_radius=1e-3, inner_steps=1, linear_steps=1)
    assert float(tree.norm(result.state.core.estimator)) <= 1e-3 * (1 + 1e-12)

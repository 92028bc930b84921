"""Many runs in one process (bilevel.many): seeds and step-size grids batched with torch.func.vmap.

The defining property: copy k of a batched run equals the lone run ``solve(..., seed=s_k,
**point_k)`` (float64: within 1e-10), records, final iterates and oracle counts alike, and the
batched path really ran vmapped (``runs.batched``), so the equality is not the loop's.
"""
import warnings

import pytest
import torch

import bilevel
from bilevel.many import BatchedStep, LoopFallback, Runs, grid_points
from bilevel.problems.quadratic import Quadratic

SEEDS = [0, 1, 2]
METRIC_SKIP = {"time"}


def quadratic():
    return Quadratic(n_samples_inner=64, n_samples_outer=64, dim_inner=4, dim_outer=3, batch_size=8, dtype="float64")


def digits():
    # batch sizes dividing the splits: every block has the same shape, so every step stacks
    return bilevel.make_problem("hyperclean-digits", preset="tiny", dtype="float64", batch_size=40,
                                val_batch_size=25, device="cpu")


#: (solver, options): SOBA, BO-REP and a Neumann solver (StocBiO), fixed steps.
CASES = {
    "soba": dict(upper_lr=0.5, lower_lr=0.3, z_lr=0.3),
    "bo-rep": dict(upper_lr=0.1, lower_lr=0.3, neumann_lr=0.3, neumann_steps=3, period=2, inner_steps=2),
    "stocbio": dict(upper_lr=0.5, lower_lr=0.3, neumann_lr=0.3, inner_steps=2, neumann_steps=3),
}


def assert_same_run(copy, lone, atol=1e-10):
    assert copy.error is None
    assert len(copy.history) == len(lone.history)
    for a, b in zip(copy.history, lone.history):
        assert set(a) == set(b)
        for key in a:
            if key in METRIC_SKIP:
                continue
            if isinstance(b[key], float):
                assert a[key] == pytest.approx(b[key], abs=atol, rel=0), key
            else:
                assert a[key] == b[key], key
    for side in ("x", "y"):
        for key, value in getattr(lone, side).items():
            torch.testing.assert_close(getattr(copy, side)[key], value, rtol=0, atol=atol)
    assert dict(copy.counts) == dict(lone.counts)
    assert copy.state.iteration == lone.state.iteration


@pytest.mark.parametrize("make", [quadratic, digits], ids=["quadratic", "hyperclean-digits"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_each_seed_equals_its_lone_run(name, make):
    problem = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoopFallback)
        runs = bilevel.solve(problem, name, steps=6, seeds=SEEDS, eval_every=2, **CASES[name])
    assert isinstance(runs, Runs) and runs.batched and runs.reason is None
    assert [r.seed for r in runs] == SEEDS
    finals = [r.x[next(iter(r.x))] for r in runs]
    assert not torch.equal(finals[0], finals[1])  # the copies differ
    for copy in runs:
        assert_same_run(copy, bilevel.solve(problem, name, steps=6, seed=copy.seed, eval_every=2, **CASES[name]))


def test_grid_crossed_with_seeds_equals_lone_runs():
    """Grid points are copies too: step sizes enter the vmapped update as per-copy tensors."""
    problem, grid = quadratic(), {"upper_lr": [0.2, 0.5], "lower_lr": [0.1, 0.3]}
    options = dict(z_lr=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoopFallback)
        runs = bilevel.solve(problem, "soba", steps=5, seeds=[0, 1], grid=grid, eval_every=5, **options)
    assert runs.batched and len(runs) == 8
    assert [(r.point, r.seed) for r in runs][:3] == [({"upper_lr": 0.2, "lower_lr": 0.1}, 0),
                                                   ({"upper_lr": 0.2, "lower_lr": 0.1}, 1),
                                                   ({"upper_lr": 0.2, "lower_lr": 0.3}, 0)]
    for copy in runs:
        assert_same_run(copy, bilevel.solve(problem, "soba", steps=5, seed=copy.seed, eval_every=5,
                                            **options, **copy.point))
    assert runs.get(seed=1, upper_lr=0.5, lower_lr=0.3) is runs[7]


def test_grid_on_a_decaying_step_applies_the_solver_decay_exponent():
    """MRBO's steps are c / (t + 1)^e with its ``*_decay`` exponents: a grid value c batched as a
    tensor keeps the exponent (BatchedStep), as the lone run's decayed(c, e) does."""
    problem = quadratic()
    options = dict(neumann_lr=0.5, neumann_steps=3)
    runs = bilevel.solve(problem, "mrbo", steps=4, seeds=[0], grid={"upper_lr": [0.05, 0.1]}, eval_every=4, **options)
    assert runs.batched
    for copy in runs:
        assert_same_run(copy, bilevel.solve(problem, "mrbo", steps=4, seed=0, eval_every=4, **options, **copy.point))
    assert BatchedStep(torch.tensor(2.0), 1.0)(3) == 0.5


def test_copies_whose_batches_differ_are_vmapped_in_groups():
    """BSA's randomized Neumann draws its own q per copy, so the batches of an iteration cannot
    all be stacked: the copies are vmapped in groups of equal q; results still equal the lone
    runs, oracle counts included (a group counts its own calls)."""
    problem, options = quadratic(), dict(neumann_lr=0.5, inner_steps=2, neumann_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoopFallback)
        runs = bilevel.solve(problem, "bsa", steps=6, seeds=SEEDS, eval_every=3, **options)
    assert runs.batched and "in groups" in runs.note
    for copy in runs:
        assert_same_run(copy, bilevel.solve(problem, "bsa", steps=6, seed=copy.seed, eval_every=3, **options))


def test_a_last_smaller_block_is_grouped_not_looped():
    """Digits with batch sizes that do not divide the splits: a copy drawing the last, smaller
    block cannot be stacked with the others; the iteration is vmapped in groups."""
    problem = bilevel.make_problem("hyperclean-digits", preset="tiny", dtype="float64", device="cpu")  # 200 / 32
    options = CASES["soba"]
    runs = bilevel.solve(problem, "soba", steps=8, seeds=SEEDS, eval_every=4, **options)
    assert runs.batched and runs.note
    for copy in runs:
        assert_same_run(copy, bilevel.solve(problem, "soba", steps=8, seed=copy.seed, eval_every=4, **options))


def test_an_update_that_raises_under_vmap_loops_from_then_on():
    """AID-CG reads tensors in Python (CG's checks): vmap refuses it; the run loops over copies."""
    problem, options = quadratic(), dict(inner_steps=2, cg_steps=2)
    with pytest.warns(LoopFallback, match="cannot be vmapped") as caught:
        runs = bilevel.solve(problem, "aid-cg", steps=3, seeds=[0, 1], eval_every=3, **options)
    assert len([w for w in caught if issubclass(w.category, LoopFallback)]) == 1
    assert not runs.batched and "cannot be vmapped" in runs.reason
    for copy in runs:
        assert_same_run(copy, bilevel.solve(problem, "aid-cg", steps=3, seed=copy.seed, eval_every=3, **options))


def test_a_diverging_grid_point_stops_only_its_copies():
    """A copy whose iterates become inf records the iteration the lone run's NonFiniteError names
    and stops its history there; the other copies run to the end."""
    import re
    problem, options = quadratic(), dict(lower_lr=0.1, z_lr=0.1)
    runs = bilevel.solve(problem, "soba", steps=40, seeds=[0, 1], grid={"upper_lr": [0.1, 1e100]}, eval_every=10,
                         **options)
    good, bad = runs.groups()
    assert all(r.error is None and len(r.history) == 5 for r in good[1])
    for r in bad[1]:
        with pytest.raises(bilevel.NonFiniteError) as lone:
            bilevel.solve(problem, "soba", steps=40, seed=r.seed, eval_every=10, upper_lr=1e100, **options)
        iteration = int(re.search(r"at iteration (\d+)", str(lone.value)).group(1))
        assert r.error and f"non-finite at iteration {iteration} " in r.error
        assert [h["iteration"] for h in r.history] == [0]
    rows = runs.summary("value")
    assert rows[0]["n"] == 2 and rows[1]["diverged"] == 2
    assert runs.best("value")["point"] == {"upper_lr": 0.1}


def test_summary_is_mean_and_std_over_seeds():
    runs = bilevel.solve(quadratic(), "soba", steps=3, seeds=SEEDS, eval_every=3, upper_lr=0.1, lower_lr=0.1, z_lr=0.1)
    values = [r.final["value"] for r in runs]
    (row,) = runs.summary("value")
    mean = sum(values) / 3
    assert row["mean"] == pytest.approx(mean)
    assert row["std"] == pytest.approx((sum((v - mean) ** 2 for v in values) / 2) ** 0.5)
    assert row["n"] == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(seeds=[0, 0]), "distinct"),
    (dict(seeds=[0, -1]), "integer >= 0"),
    (dict(seeds=[]), "non-empty"),
    (dict(seeds=[0], grid={"beta": [0.5]}), "grid.beta: not a step-size field"),
    (dict(seeds=[0], grid={"upper_lr": [0.1, -1.0]}), "grid.upper_lr: every value must be a positive number"),
    (dict(seeds=[0], grid={"upper_lr": []}), "non-empty list"),
    (dict(seeds=[0], progress=True), "progress is not supported with seeds/grid"),
])
def test_bad_seeds_and_grids_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bilevel.solve(quadratic(), "soba", steps=1, **kwargs)


def test_grid_points_order():
    solver = bilevel.make_solver("soba")
    assert grid_points(solver, None) == [{}]
    assert grid_points(solver, {"upper_lr": [1, 2], "z_lr": [3]}) == [{"upper_lr": 1.0, "z_lr": 3.0},
                                                                     {"upper_lr": 2.0, "z_lr": 3.0}]


def test_auto_steps_resolved_per_copy_enter_as_tensors():
    """neumann_lr="auto" is estimated at each copy's own start, so the copies' Neumann steps
    differ; they enter the vmapped update as per-copy tensors and every copy equals its lone run."""
    problem, options = quadratic(), dict(upper_lr=0.1, lower_lr=0.3, neumann_lr="auto", neumann_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoopFallback)
        runs = bilevel.solve(problem, "bo-rep", steps=4, seeds=[0, 1], eval_every=2, **options)
    assert runs.batched
    assert runs[0].state.resolved["neumann_lr"] != runs[1].state.resolved["neumann_lr"]
    for copy in runs:
        assert_same_run(copy, bilevel.solve(problem, "bo-rep", steps=4, seed=copy.seed, eval_every=2, **options))

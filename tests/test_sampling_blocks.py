"""Epoch-shuffled fixed blocks (bilevel/sampling.py), the default sampling of finite-sum problems.

Blocks are fixed consecutive index ranges; each epoch serves all of them once in an order drawn
afresh (torch.randperm) from the run's generator, which also keeps the position in the epoch:
resuming a checkpoint continues mid-epoch, and two runs on one problem object do not interfere.
"""
import pytest
import torch

import bilevel
import bilevel.solvers.f2sa  # noqa: F401  (registers the solvers used below)
import bilevel.solvers.mrbo  # noqa: F401
import bilevel.solvers.saba  # noqa: F401
import bilevel.solvers.soba  # noqa: F401
from bilevel import tree
from bilevel.problem import BilevelProblem
from bilevel.problems.batches import IndexBatches
from bilevel.problems.quadratic import Quadratic
from bilevel.sampling import Blocks, RunGenerator, copy_generator, run_generator

N_IN, N_OUT, B = 30, 20, 8  # lower: 4 blocks (the last one [24, 30)); upper: 3 blocks (the last [16, 20))


def tiny(**options):
    return Quadratic(n_samples_inner=N_IN, n_samples_outer=N_OUT, dim_inner=3, dim_outer=2, batch_size=B, seed=1,
                     **options)


def test_blocks_are_fixed_consecutive_ranges_with_weights():
    blocks = Blocks(N_IN, B)
    assert blocks.n_batches == 4
    assert [blocks.batch(k).tolist() for k in range(4)] == [list(range(k * B, min(N_IN, (k + 1) * B))) for k in range(4)]
    assert [blocks.weight(k) for k in range(4)] == [8 / 30, 8 / 30, 8 / 30, 6 / 30]


def test_each_epoch_serves_every_block_once_in_a_fresh_order():
    blocks, g = Blocks(N_IN, B, "lower"), run_generator(0)
    epochs = [tuple(blocks.draw(g) for _ in range(4)) for _ in range(8)]
    assert all(sorted(e) == [0, 1, 2, 3] for e in epochs)
    assert len(set(epochs)) > 2, epochs  # the order changes between epochs (and the first is shuffled too)
    # the first order is torch.randperm(4) from the seed: nothing is drawn before it
    assert list(epochs[0]) == torch.randperm(4, generator=torch.Generator().manual_seed(0)).tolist()


def test_random_numbers_are_drawn_only_when_an_epoch_starts():
    blocks, g = Blocks(N_IN, B, "lower"), run_generator(0)
    changed = []
    for _ in range(9):
        before = g.get_state().clone()
        blocks.draw(g)
        changed.append(not torch.equal(before, g.get_state()))
    assert changed == [True, False, False, False, True, False, False, False, True]


def test_problem_samples_cover_each_split_once_per_epoch_per_level():
    problem, g = tiny(), run_generator(3)
    lower, upper = [], []
    for _ in range(12):  # 3 lower epochs, 4 upper epochs, interleaved
        lower.append(problem.sample("lower", g)), upper.append(problem.sample("upper", g))
    for batches, n, k in ((lower, N_IN, 4), (upper, N_OUT, 3)):
        for e in range(len(batches) // k):
            epoch = torch.cat(batches[e * k:(e + 1) * k])
            assert torch.equal(epoch.sort().values, torch.arange(n)), (n, e)
    assert lower[0].dtype == torch.long


def test_replacement_option_keeps_iid_uniform_indices():
    problem, g, twin = tiny(sampling="replacement"), run_generator(5), torch.Generator().manual_seed(5)
    for level, n in (("lower", N_IN), ("upper", N_OUT), ("lower", N_IN)):
        assert torch.equal(problem.sample(level, g), torch.randint(n, (B,), generator=twin))
    with pytest.raises(ValueError, match="quadratic: option sampling must be one of"):
        tiny(sampling="shuffle")


def test_plain_generator_gets_one_uniform_block():
    """A plain torch.Generator holds no epoch: each draw is the block of one randint(K)."""
    problem, g, twin = tiny(), torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for _ in range(5):
        k = int(torch.randint(4, (1,), generator=twin))
        assert torch.equal(problem.sample("lower", g), Blocks(N_IN, B).batch(k))


class Splits(IndexBatches, BilevelProblem):
    """The IndexBatches mixin on two splits of 10 and 7 samples."""
    n_train, n_val, batch_size, val_batch_size = 10, 7, 4, 3

    def upper_loss(self, x, y, batch):
        return (x["x"] * y["y"]).sum()

    lower_loss = upper_loss

    def init(self, generator):
        return {"x": torch.ones(1)}, {"y": torch.ones(1)}


def test_index_batches_default_to_blocks_and_keep_replacement_as_option():
    problem, g = Splits(), run_generator(0)
    lower = torch.cat([problem.sample("lower", g) for _ in range(3)])  # one epoch: blocks of 4, 4, 2
    upper = torch.cat([problem.sample("upper", g) for _ in range(3)])  # blocks of 3, 3, 1
    assert torch.equal(lower.sort().values, torch.arange(10)) and torch.equal(upper.sort().values, torch.arange(7))
    problem.sampling, g, twin = "replacement", run_generator(1), torch.Generator().manual_seed(1)
    assert torch.equal(problem.sample("lower", g), torch.randint(10, (4,), generator=twin))
    problem.sampling = "sideways"
    with pytest.raises(ValueError, match="sampling must be one of"):
        problem.sample("lower", g)


def test_registered_finite_sum_problems_default_to_blocks():
    from bilevel.problems.hpo import HyperparameterOptimization
    from bilevel.problems.hyperclean import Hyperclean
    from bilevel.problems.hyperclean_digits import HypercleanDigits
    from bilevel.problems.text_classifier import TextClassifierProblem
    classes = (HyperparameterOptimization, HypercleanDigits, Hyperclean, TextClassifierProblem)
    assert [c.sampling for c in classes] + [tiny().sampling] == ["blocks"] * 5


def test_auc_splits_are_stored_in_mixed_order(tmp_path):
    """Blocks are consecutive rows: DeepAUC's train and val splits must not be sorted by class
    (they were: the class-by-class picks of imbalanced_splits, sorted, left val's classes in two
    runs, so its blocks were single-class)."""
    from bilevel.problems.auc import DeepAUC
    from data_fixtures import write_rotten_tomatoes
    path = str(write_rotten_tomatoes(tmp_path / "rt.csv.bz2", n=600, seed=0))
    pb = DeepAUC(data_path=path, **{**DeepAUC.PRESETS["tiny"], "n_train": 150, "n_val": 150, "n_test": 100})
    for labels in (pb.data.train_labels, pb.data.val_labels):
        blocks = Blocks(len(labels), 32)
        assert all(0 < float(labels[blocks.batch(k)].float().mean()) < 1 for k in range(blocks.n_batches)), labels


class Recording(BilevelProblem):
    """Delegates to ``inner`` and records (level, batch) of every loss evaluation."""

    def __init__(self, inner):
        self.inner, self.seen, self.name = inner, [], inner.name
        self.sampling = inner.sampling

    def upper_loss(self, x, y, batch):
        self.seen.append(("upper", batch))
        return self.inner.upper_loss(x, y, batch)

    def lower_loss(self, x, y, batch):
        self.seen.append(("lower", batch))
        return self.inner.lower_loss(x, y, batch)

    def init(self, generator):
        return self.inner.init(generator)

    def sample(self, level, generator):
        return self.inner.sample(level, generator)

    def n_samples(self, level):
        return self.inner.n_samples(level)


@pytest.mark.parametrize("name", ["soba", "saba"])
def test_run_sees_the_generators_blocks_in_order_and_wastes_none(name):
    """solve's first batches are the first blocks of the seed's epochs (validate() draws from a
    copy), one lower then one upper block per SOBA step; SABA's memory indexes the same blocks."""
    problem = Recording(tiny())
    bilevel.solve(problem, name, steps=9, seed=4, **({"batch_size": B} if name == "saba" else {}))
    seen = problem.seen[2:]  # validate() evaluates each loss once first
    twin = run_generator(4)
    problem.inner.init(twin)
    expected = [(level, problem.inner.sample(level, twin)) for _ in range(9) for level in ("lower", "upper")]
    assert [lvl for lvl, _ in seen] == [lvl for lvl, _ in expected]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(seen, expected))


def hyperparameters(name):
    return {"saba": dict(batch_size=B), "f2sa": dict(inner_steps=2)}.get(name, {})


@pytest.mark.parametrize("name", ["soba", "saba", "f2sa", "mrbo"])
def test_resume_mid_epoch_equals_the_uninterrupted_run(name, tmp_path):
    problem, hp = tiny(), hyperparameters(name)
    whole = bilevel.solve(problem, name, steps=7, seed=3, **hp)
    first = bilevel.solve(problem, name, steps=3, seed=3, **hp)
    streams = first.state.generator.streams
    assert any(0 < epoch.position < len(epoch.order) for epoch in streams.values()), streams  # mid-epoch
    torch.save(first.state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=False)
    assert isinstance(loaded.generator, RunGenerator) and loaded.generator.streams == streams
    rest = bilevel.solve(problem, name, steps=4, state=loaded, **hp)
    assert tree.is_close(rest.x, whole.x, rtol=0, atol=0) and tree.is_close(rest.y, whole.y, rtol=0, atol=0)
    again = bilevel.solve(problem, name, steps=4, state=first.state, **hp)  # the checkpoint was not consumed
    assert tree.is_close(again.x, whole.x, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["soba", "f2sa"])
def test_two_runs_on_one_problem_object_equal_runs_on_two_objects(name):
    """Steps of two runs interleaved on ONE problem object == each run alone on its own object."""
    hp = hyperparameters(name)

    def start(problem, seed):
        solver, g = bilevel.make_solver(name, **hp), run_generator(seed)
        return solver, solver.init(problem, *problem.init(g), g)

    shared = tiny()
    (sa, a), (sb, b) = start(shared, 0), start(shared, 1)
    for _ in range(6):
        a, b = sa.step(shared, a), sb.step(shared, b)
    for seed, interleaved in ((0, a), (1, b)):
        own = tiny()
        solver, alone = start(own, seed)
        for _ in range(6):
            alone = solver.step(own, alone)
        assert tree.is_close(alone.x, interleaved.x, rtol=0, atol=0)
        assert tree.is_close(alone.y, interleaved.y, rtol=0, atol=0)


def test_copy_generator_is_independent_and_keeps_positions():
    g = run_generator(0)
    Blocks(N_IN, B, "lower").draw(g)
    c = copy_generator(g)
    assert c.streams == g.streams and torch.equal(c.get_state(), g.get_state())
    Blocks(N_IN, B, "lower").draw(c)
    assert g.streams[("lower", N_IN, B)].position == 1 and c.streams[("lower", N_IN, B)].position == 2
    plain = torch.Generator().manual_seed(7)
    assert copy_generator(plain).streams == {} and torch.equal(copy_generator(plain).get_state(), plain.get_state())

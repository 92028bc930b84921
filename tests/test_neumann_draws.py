"""Every random draw of a step comes from the run's generator, in the algorithm's order, and
none is wasted: a problem whose sample() records its calls counts them per iteration."""
import pytest
import torch

import bilevel
from bilevel import count_calls
from bilevel.problem import BilevelProblem
from bilevel.problems.quadratic import Quadratic


class Recording(BilevelProblem):
    """A stochastic quadratic whose sample() records (level, generator) and whose lower loss
    records the batches it is called on."""

    def __init__(self, batch_size=8):
        self.inner = Quadratic(n_samples_inner=64, n_samples_outer=64, dim_inner=6, dim_outer=3, batch_size=batch_size)
        self.samples, self.used = [], []

    def sample(self, level, generator):
        self.samples.append((level, generator))
        return len(self.samples) - 1, self.inner.sample(level, generator)

    def upper_loss(self, x, y, batch):
        return self.inner.upper_loss(x, y, batch[1])

    def lower_loss(self, x, y, batch):
        self.used.append(batch[0])
        return self.inner.lower_loss(x, y, batch[1])

    def init(self, generator):
        return self.inner.init(generator)


def one_step(name, **hp):
    problem, g = Recording(), torch.Generator().manual_seed(0)
    solver = bilevel.make_solver(name, **hp)
    state = solver.step(problem, solver.init(problem, *problem.init(g), g))
    problem.samples.clear(), problem.used.clear()
    with count_calls() as counts:
        state = solver.step(problem, state)
    return problem, state, counts


@pytest.mark.parametrize("name, hp, lower_draws", [
    ("amigo", dict(inner_steps=3, linear_steps=4), 3 + 4 + 1),  # lower steps, one batch per z step, cross
    ("stocbio", dict(inner_steps=3, neumann_steps=5), 3 + 5 + 1),  # lower steps, one batch per product, cross
    ("aid-cg", dict(inner_steps=3, cg_steps=4), 3 + 1 + 1),  # CG: one Hessian batch, cross
])
def test_draws_per_iteration(name, hp, lower_draws):
    """One upper batch and exactly the lower batches the step uses, all from the run generator,
    each used (the old draw() added a Hessian batch that resampling estimators never used, and
    drew their per-product batches from a private generator)."""
    problem, state, counts = one_step(name, **hp)
    levels = [level for level, _ in problem.samples]
    assert levels.count("upper") == 1 and levels.count("lower") == lower_draws, levels
    assert all(gen is state.generator for _, gen in problem.samples)
    lower_ids = {i for i, (level, _) in enumerate(problem.samples) if level == "lower"}
    assert lower_ids == set(problem.used)  # every lower batch drawn is used by some oracle


def test_ttsa_draws_q_then_q_batches_from_the_run_generator():
    """TTSA: lower batch of the y step, q ~ U{0..Q} from the run generator, upper batch, q Hessian
    batches, cross batch; q HVPs."""
    Q = 6
    for _ in range(3):
        problem, g = Recording(), torch.Generator().manual_seed(0)
        solver = bilevel.make_solver("ttsa", neumann_steps=Q, neumann_lr=0.5)
        state = solver.init(problem, *problem.init(g), g)
        qs = []
        for _ in range(5):
            replay = torch.Generator()
            replay.set_state(state.generator.get_state())
            problem.inner.sample("lower", replay)  # the y step's batch
            q = int(torch.randint(Q + 1, (1,), generator=replay))
            problem.samples.clear()
            with count_calls() as counts:
                state = solver.step(problem, state)
            assert [level for level, _ in problem.samples] == ["lower", "upper"] + ["lower"] * q + ["lower"]
            assert counts["hvp"] == q
            qs.append(q)
        assert len(set(qs)) > 1, qs


class Deterministic(Recording):
    """Full batches: sample() never touches the generator."""

    def sample(self, level, generator):
        self.samples.append((level, generator))
        return len(self.samples) - 1, None


def test_randomized_term_is_the_run_generators_only_draw():
    """With full batches the run generator's only use in a TTSA step is the Neumann term: the
    generator after the step is the generator after one torch.randint(Q + 1) (formerly a seed
    drawn for a private torch.Generator)."""
    Q = 4
    problem, g = Deterministic(None), torch.Generator().manual_seed(2)
    solver = bilevel.make_solver("ttsa", neumann_steps=Q, neumann_lr=0.5)
    state = solver.init(problem, *problem.init(g), g)
    for _ in range(3):
        replay = torch.Generator()
        replay.set_state(state.generator.get_state())
        q = int(torch.randint(Q + 1, (1,), generator=replay))
        with count_calls() as counts:
            state = solver.step(problem, state)
        assert counts["hvp"] == q
        assert torch.equal(state.generator.get_state(), replay.get_state())

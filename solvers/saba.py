"""SABA: SOBA's single loop with SAGA variance reduction on every direction.

Dagreou, Ablin, Vaiter, Moreau. A framework for bilevel optimization that enables stochastic and
global variance reduction algorithms. NeurIPS 2022.

For finite sums g = sum_k w_k g_k and f = sum_k w_k f_k over fixed mini-batches (bilevel.memory:
each level's n_samples(level) indices cut into consecutive mini-batches of ``batch_size``, the
last possibly smaller, w_k = |B_k| / n), draw one lower mini-batch i and one upper mini-batch j
per iteration (in that order, from the run generator: the next blocks of each level's
epoch-shuffled order, as benchopt, or uniformly with the problem's sampling="replacement") and,
at the current (x_t, y_t, z_t),

    grad_y g_i,  H_i z_t = d2_yy g_i . z_t,  J_i z_t = d2_xy g_i . z_t    (one double-backward pass on i)
    grad_x f_j,  grad_y f_j                                               (one pass on j)

Each of these five quantities q gets its SAGA estimate (bilevel.memory.saga), with a memory
entry per mini-batch of its level:

    q_hat = K w_i (q_i - M[i]) + sum_k w_k M[k],      then M[i] <- q_i

and SOBA's directions and simultaneous updates are taken with the estimates:

    D_y = grad_y g_hat,   D_z = (H z)_hat - grad_y f_hat,   D_x = grad_x f_hat - (J z)_hat
    y_{t+1} = y_t - lower_lr_t D_y,   z_{t+1} = z_t - z_lr_t D_z,   x_{t+1} = x_t - upper_lr_t D_x

(z is -v of the paper). The estimate is unbiased for the full-batch direction; K w_i = 1 when all
mini-batches have the same size. The problem must be a finite sum: ``n_samples(level)`` and losses
taking LongTensor index batches (TypeError otherwise); its own ``sample`` and batch size are not
used. State (:class:`SABAState`): x, y, z and memories = {"lower": Memory, "upper": Memory},
each Memory's table one tensor per leaf stacked over the mini-batches; the batches of an
iteration are the two mini-batches as :class:`bilevel.memory.Block` records (index, sample
indices, weights as tensors), so the step reads and writes its memory entry by a tensor index
and is one graph whichever blocks are drawn (``compile=True``, ``torch.func.vmap``).

Defaults are benchopt's (benchmark_bilevel solvers/saba.py: step_size 0.1, outer_ratio 1, zero
decay exponents, "SABA works with constant stepsizes"): upper_lr = lower_lr = z_lr = 0.1,
constant, as in the paper's analysis of SABA (constant steps, linear convergence under PL);
batch_size 64; memory_init "zero" (benchopt's mode_init_memory); "full" fills the memories by a
full pass at (x_0, y_0, z_0 = 0). Each step size may be a schedule (bilevel.schedules).

Cost per iteration: one lower gradient, one HVP, one cross product (shared pass,
bilevel.oracles.hvp_and_cross), one upper gradient. init with memory_init="full": that per
lower mini-batch (K_lower) and one upper gradient per upper mini-batch (K_upper).
"""
from dataclasses import dataclass
from typing import Any, Dict, NamedTuple

from bilevel import memory, oracles, tree, upper
from bilevel.registry import register_solver
from bilevel.schedules import StepSize, at
from bilevel.solver import Solver
from bilevel.tree import Tree
from bilevel.validation import check_choice, check_count, check_positive

MEMORY_INITS = ("zero", "full")


class SABAState(NamedTuple):
    """x, y, z, the SAGA memories {"lower": Memory, "upper": Memory} and the upper state."""
    x: Tree
    y: Tree
    z: Tree
    memories: Dict[str, memory.Memory]
    upper: Any


class SABABatches(NamedTuple):
    """Iteration t's lower mini-batch i and upper mini-batch j (drawn in that order), each as a
    :class:`bilevel.memory.Block` (index, sample indices, w and K w as tensors)."""
    t: int
    lower: memory.Block
    upper: memory.Block


@register_solver("saba", paper="Dagreou, Ablin, Vaiter, Moreau. A framework for bilevel optimization that enables stochastic and global variance reduction algorithms. NeurIPS 2022")
@dataclass
class SABA(Solver):
    """SOBA with a SAGA memory per mini-batch on all five directions (finite-sum problems)."""
    upper_lr: StepSize = 0.1
    lower_lr: StepSize = 0.1
    z_lr: StepSize = 0.1
    batch_size: int = 64
    memory_init: str = "zero"

    def __post_init__(self):
        check_positive(self, "upper_lr", "lower_lr", "z_lr")
        check_count(self, "batch_size")
        check_choice(self, "memory_init", MEMORY_INITS)

    def partitions(self, problem):
        return {level: memory.partition_of(problem, level, self.batch_size, "saba") for level in ("lower", "upper")}

    def init(self, problem, x, y, generator):
        parts, z = self.partitions(problem), tree.zeros_like(y)
        if self.memory_init == "full":  # a full pass at (x_0, y_0, z_0)
            device = generator.device
            memories = {"lower": memory.full([self._lower_terms(problem, x, y, z, block.indices) for block in
                                              memory.blocks(parts["lower"], device)], parts["lower"]),
                        "upper": memory.full([self._upper_terms(problem, x, y, block.indices) for block in
                                              memory.blocks(parts["upper"], device)], parts["upper"])}
        else:
            memories = {"lower": memory.zeros({"grad_y": y, "hvp": y, "cross": x}, parts["lower"]),
                        "upper": memory.zeros({"grad_x": x, "grad_y": y}, parts["upper"])}
        return self.start(SABAState(x=x, y=tree.clone(y), z=z, memories=memories,
                                    upper=upper.sgd(self.upper_lr).init(x)), generator)

    def sample(self, problem, t, generator) -> SABABatches:
        parts = self.partitions(problem)
        i = memory.block(parts["lower"], parts["lower"].draw(generator), generator.device)
        return SABABatches(t, i, memory.block(parts["upper"], parts["upper"].draw(generator), generator.device))

    def update(self, problem, s: SABAState, batches: SABABatches) -> SABAState:
        t, i, j = batches.t, batches.lower, batches.upper
        if isinstance(s.memories["lower"].table, tuple):
            raise ValueError("SABA: this state holds its SAGA memory as a tuple of entries, the layout of "
                             "checkpoints written before the memory became stacked tensors; such a run cannot "
                             "be resumed, start it again")
        low, lower_memory = memory.saga(s.memories["lower"], i, self._lower_terms(problem, s.x, s.y, s.z, i.indices))
        up, upper_memory = memory.saga(s.memories["upper"], j, self._upper_terms(problem, s.x, s.y, j.indices))
        direction, upper_state = upper.sgd(self.upper_lr).update(tree.sub(up["grad_x"], low["cross"]), s.upper, t=t)
        return SABAState(x=upper.apply(s.x, direction), y=tree.axpy(-at(self.lower_lr, t), low["grad_y"], s.y),
                         z=tree.axpy(-at(self.z_lr, t), tree.sub(low["hvp"], up["grad_y"]), s.z),
                         memories={"lower": lower_memory, "upper": upper_memory}, upper=upper_state)

    @staticmethod
    def _lower_terms(problem, x, y, z, indices):
        hz, cross_z, grad_y = oracles.hvp_and_cross(problem, x, y, z, indices)
        return {"grad_y": grad_y, "hvp": hz, "cross": cross_z}

    @staticmethod
    def _upper_terms(problem, x, y, indices):
        grad_x, grad_y = oracles.grad_upper(problem, x, y, indices)
        return {"grad_x": grad_x, "grad_y": grad_y}

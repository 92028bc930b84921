"""bilevel: stochastic bilevel optimization in PyTorch.

    min_x f(x, y*(x))   s.t.   y*(x) = argmin_y g(x, y)

Define a :class:`BilevelProblem` (or a :class:`FunctionProblem` from two functions), then call
:func:`solve` with a registered solver name, or :func:`hypergradient` for one estimate.
``solve(..., seeds=[...], grid={...})`` runs many copies batched with torch.func.vmap and
returns a :class:`Runs` (:mod:`bilevel.many`).
:func:`load_checkpoint` reads a run's ``<solver>.state.pt`` to continue it with ``solve(...,
state=checkpoint)``.
"""
from .checkpoint import Checkpoint, CheckpointError, CheckpointMismatch, load_checkpoint, save_checkpoint
from .hypergrad import hypergradient
from .many import Runs
from .oracles import count_calls
from .problem import BilevelProblem, FunctionProblem
from .registry import PROBLEMS, SOLVERS, make_problem, make_solver, register_problem, register_solver
from .solve import Callback, NonFiniteError, Result, solve
from .solver import ComposedSolver, Solver, State

__version__ = "0.1.0"

__all__ = [
    "BilevelProblem", "FunctionProblem", "hypergradient", "solve", "Result", "Callback",
    "NonFiniteError", "Solver", "ComposedSolver", "State", "count_calls", "register_solver",
    "register_problem", "make_solver", "make_problem", "SOLVERS", "PROBLEMS", "__version__",
    "load_checkpoint", "save_checkpoint", "Checkpoint", "CheckpointError", "CheckpointMismatch", "Runs",
]

"""The default run a problem declares for a preset (its ``RUNS[preset]``, read by
:func:`bilevel.config.default_run`): the main job's solver set, each with step sizes chosen for
that problem, a step budget and an evaluation interval."""
from __future__ import annotations

from typing import Any, Dict

#: The solvers of every problem's default tiny run: the no-bilevel baseline, two single-loop and
#: two double-loop classics, and the normalized-momentum methods BO-REP and SLIP.
DEFAULT_SOLVERS = ("lower-only", "soba", "stocbio", "aid-cg", "bo-rep", "slip")


def default_run(*, steps: int, eval_every: int, solver_options: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """A ``RUNS`` entry running :data:`DEFAULT_SOLVERS` with ``solver_options`` (one entry each)."""
    missing = sorted(set(DEFAULT_SOLVERS) ^ set(solver_options))
    if missing:
        raise ValueError(f"a default run gives step sizes for exactly {list(DEFAULT_SOLVERS)}; check {missing}")
    return dict(steps=steps, eval_every=eval_every, solvers=list(DEFAULT_SOLVERS), solver_options=solver_options)

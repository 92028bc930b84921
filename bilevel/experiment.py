"""Run a configuration: every selected solver on one problem, logged and summarized.

Writes into a new run folder ``<output_dir>/<name>``: ``config.yaml`` (resolved), one
``<solver>.jsonl`` metrics file and one ``<solver>.state.pt`` checkpoint per solver,
``summary.md`` / ``summary.csv`` and ``curves.png``. A solver that fails (NaN, error) is reported
in the table and the others still run; nothing already written is removed or overwritten.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from . import config as config_module
from . import report
from .logging import JsonlLogger, ProgressBar, WandbLogger
from .registry import make_problem, make_solver
from .solve import Result, solve


@dataclasses.dataclass
class ExperimentResult:
    run_dir: Path
    outcomes: Dict[str, object]
    rows: List[Dict[str, object]]
    table: str

    @property
    def failed(self) -> List[str]:
        return [n for n, o in self.outcomes.items() if not isinstance(o, Result)]


def new_run_dir(output_dir: str, name: Optional[str], problem: str) -> Path:
    """A fresh folder: never reuses one that exists (a suffix -2, -3, ... is added)."""
    base = Path(output_dir) / (name or f"{problem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    candidate, k = base, 1
    while candidate.exists():
        k += 1
        candidate = base.with_name(f"{base.name}-{k}")
    candidate.mkdir(parents=True)
    return candidate


def save_state(state, path: Path) -> None:
    """Checkpoint a solver state (tensors, generator, counters) with ``torch.save``."""
    torch.save(state, path)


def load_state(path: Path):
    """Load a checkpoint written by :func:`save_state` (trusted files only: it unpickles)."""
    return torch.load(path, weights_only=False)


def run_experiment(cfg: DictConfig, echo=print) -> ExperimentResult:
    """Run every solver of ``cfg`` (validated by :func:`bilevel.config.load`)."""
    try:
        problem = make_problem(cfg.problem, **config_module.merged_problem_options(
            cfg.problem, cfg.preset, cfg.problem_options))
    except (TypeError, ValueError, FileNotFoundError) as exc:  # a rejected option value, a missing data file
        raise config_module.ConfigError(f"problem {cfg.problem!r} (problem_options): {exc}") from None
    solvers = {name: make_solver(name, **config_module.solver_options(cfg, name)) for name in cfg.solvers}
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    metrics = list(cfg.metrics) or list(getattr(problem, "headline_metrics", ()))
    run_dir = new_run_dir(cfg.output_dir, cfg.name, cfg.problem)
    (run_dir / "config.yaml").write_text(config_module.to_yaml(cfg))
    echo(f"run folder: {run_dir}")

    outcomes: Dict[str, object] = {}
    for position, (name, solver) in enumerate(solvers.items()):
        callbacks = [JsonlLogger(run_dir / f"{name}.jsonl")]
        if cfg.progress:
            callbacks.append(ProgressBar(cfg.steps, description=f"{name:>12s}"))
        if cfg.wandb.enabled:
            callbacks.append(WandbLogger(project=cfg.wandb.project, name=f"{run_dir.name}/{name}",
                                         group=cfg.wandb.group or run_dir.name, mode=cfg.wandb.mode,
                                         directory=cfg.wandb.dir or str(run_dir),
                                         config=OmegaConf.to_container(cfg, resolve=True)))
        try:
            result = solve(problem, solver, cfg.steps, seed=cfg.seed, eval_every=cfg.eval_every,
                           callbacks=callbacks)
        except (FloatingPointError, ValueError, RuntimeError, TypeError) as error:
            # TypeError: the solver cannot handle this problem (e.g. SABA on a problem that is
            # not a finite sum); the message says what is missing. The other solvers still run.
            echo(f"{name} failed: {type(error).__name__}: {error}")
            outcomes[name] = error
            continue
        save_state(result.state, run_dir / f"{name}.state.pt")
        outcomes[name] = result
        if not metrics:
            metrics = [k for k in result.final if not k.startswith("calls/") and k not in ("iteration", "time")]

    rows = report.summary_rows(outcomes, metrics)
    columns = ["solver", *metrics, "wall_time_s", "ms_per_iter", "oracle_calls", "status"]
    table = report.format_table(rows, columns)
    (run_dir / "summary.md").write_text(f"# {cfg.problem}, {cfg.steps} steps, seed {cfg.seed}\n\n{table}\n")
    report.write_csv(rows, run_dir / "summary.csv")
    if cfg.plot and any(isinstance(o, Result) for o in outcomes.values()):
        report.plot_curves(outcomes, metrics, run_dir / "curves.png", title=f"{cfg.problem} (seed {cfg.seed})")
    echo(table)
    echo(f"wrote {run_dir}/summary.md, summary.csv" + (", curves.png" if cfg.plot else ""))
    return ExperimentResult(run_dir, outcomes, rows, table)

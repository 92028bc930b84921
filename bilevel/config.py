"""Run configuration: OmegaConf structured configs, validated before any work.

    bilevel run [CONFIG.yaml] [key=value ...]

The schema is :class:`RunConfig`. Without a CONFIG file the embedded main job
(``bilevel/configs/default.yaml``: hyper-cleaning on scikit-learn's digits, five bilevel solvers
against the no-cleaning baseline, step sizes tuned for it) is the base; overriding ``problem`` drops its
problem- and solver-specific options, and naming a problem or a preset on the command line (no
CONFIG file) takes that problem's default run for the preset (its ``RUNS[preset]``: solvers,
their step sizes, steps, eval_every; see :func:`default_run`) when it has one. Overriding
``solvers`` drops the options of solvers no longer selected. ``solver=NAME`` is a shorthand for
``solvers=[NAME]``, and then ``solver.KEY=VALUE`` for ``solver_options.NAME.KEY=VALUE``. Problem and solver options go under ``problem_options.KEY`` and
``solver_options.SOLVER.KEY``; they are checked against the problem's constructor and the
solver's dataclass fields (names *and* types), so a typo fails at once with the list of valid
names.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import schedules
from .oracles import HVP_MODES
from .registry import PROBLEMS, SOLVERS, check_options, preset_options


class ConfigError(ValueError):
    """A configuration is invalid; the message names the key and what is expected."""


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "bilevel"
    #: "online", "offline" or "disabled"; None: offline unless W&B credentials are present.
    mode: Optional[str] = None
    group: Optional[str] = None
    #: Where W&B writes its files; None: <run folder>/wandb.
    dir: Optional[str] = None


@dataclass
class RunConfig:
    problem: str = "hyperclean-digits"
    #: A named option set of the problem ("tiny", "paper", ...; ``bilevel list --options`` shows
    #: them); ``problem_options`` override its entries.
    preset: Optional[str] = None
    problem_options: Dict[str, Any] = field(default_factory=dict)
    solvers: List[str] = field(default_factory=lambda: ["lower-only", "soba", "stocbio", "aid-cg"])
    solver_options: Dict[str, Any] = field(default_factory=dict)
    steps: int = 1000
    seed: int = 0
    #: Many runs in one process (bilevel.many): one copy per seed, batched with torch.func.vmap
    #: (``seeds=[0,1,2]``); null: the single run with ``seed``. Summaries then hold mean +- std
    #: over seeds.
    seeds: Optional[List[int]] = None
    #: A step-size grid crossed with the seeds (``grid.upper_lr=[0.01,0.1]``): field -> list of
    #: values, applied to every selected solver that has the field; the summary picks the best
    #: point per solver on the problem's validation metric (its ``selection``).
    grid: Dict[str, Any] = field(default_factory=dict)
    eval_every: int = 50
    #: Parent folder of run folders.
    output_dir: str = "results"
    #: Run folder name; None: <problem>-<UTC timestamp>.
    name: Optional[str] = None
    progress: bool = True
    plot: bool = True
    #: Write ``<solver>.state.pt`` every this many steps; None: at every evaluation; 0: only at
    #: the end and at an interruption.
    checkpoint_every: Optional[int] = None
    #: A finished solver whose x or y has an entry larger than this (in absolute value) is
    #: reported "diverged", as is one whose tracked metric is NaN/inf.
    divergence_bound: float = 1e6
    #: torch intra-op threads for the run; null: torch's default (all cores). One thread is the
    #: default: the problems here are small, and several threads were 3x slower for three
    #: concurrent runs and 25x slower under outside load (measured; README, "Threads").
    threads: Optional[int] = 1
    #: Run each solver step through torch.compile (bilevel.compiled; with seeds or grid, the
    #: vmapped update of all copies, bilevel.many_compile); a step that cannot be traced runs
    #: eagerly with one warning naming the reason.
    compile: bool = False
    #: With seeds or grid on a CUDA device: capture the vmapped update in CUDA graphs and replay
    #: them (bilevel.many_graph); an error on another device or without seeds/grid.
    cuda_graph: bool = False
    #: How Hessian-vector and cross products are taken in every solver's estimator: "reverse"
    #: (reverse-over-reverse) or "forward" (forward-over-reverse); see README, "hvp_mode".
    hvp_mode: str = "reverse"
    #: Metrics for the table and the plot; empty: the problem's ``headline_metrics`` or all.
    metrics: List[str] = field(default_factory=list)
    #: Where the run happens: "cpu", "cuda", "cuda:N"; null (or "auto"): cuda when available,
    #: else cpu. The problem is built there once and the run's generator lives there.
    device: Optional[str] = None
    #: Precision of the problem: "float32", "float64", or "bfloat16" (float32 variables, the
    #: networks under bf16 autocast; problems with neural networks only); null: the problem's
    #: own ``dtype`` option (problem_options.dtype or its default). Sets problem_options.dtype.
    dtype: Optional[str] = None
    wandb: WandbConfig = field(default_factory=WandbConfig)


def _schema():
    return OmegaConf.structured(RunConfig)


DEFAULT_JOB = Path(__file__).parent / "configs" / "default.yaml"


def load(path: Optional[str] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Merge the schema, the YAML file (default: the embedded main job) and ``key=value``
    overrides; then validate."""
    try:
        given = OmegaConf.from_dotlist(_shorthands(overrides))
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        base = _read_yaml(path if path is not None else DEFAULT_JOB)
        for source, where in ((base, f"config file {path}"), (given, "command line")):
            _check_container_types(source, where)
        if path is None and "problem" in given and given.problem != base.get("problem"):
            for key in ("preset", "problem_options", "solver_options", "metrics"):  # they belong to its problem
                base.pop(key, None)
        if path is None and ("problem" in given or "preset" in given):
            run = default_run(given.get("problem", base.get("problem")), given.get("preset", base.get("preset")))
            if run:  # the problem's own default run for this preset replaces the main job's
                for key in ("solvers", "solver_options", "steps", "eval_every"):
                    base.pop(key, None)
                base = OmegaConf.merge(base, OmegaConf.create(run))
        cfg = OmegaConf.merge(_schema(), base, given)
        if "solvers" in given:
            explicit = set(given.get("solver_options") or {})
            cfg.solver_options = {k: v for k, v in cfg.solver_options.items()
                                  if k in cfg.solvers or k in explicit}
    except OmegaConfBaseException as exc:
        raise ConfigError(_explain(exc)) from exc
    validate(cfg)
    return cfg


def _read_yaml(path) -> DictConfig:
    """The YAML file as a DictConfig; ConfigError naming the file and line when malformed."""
    import yaml
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path}: malformed YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path}: must be a mapping of key: value at the top level, not a list")
    return loaded


def _check_container_types(source: DictConfig, where: str) -> None:
    """A list- or mapping-valued key given a single value gets a plain message (OmegaConf's
    would be "AnyNode is not a ListConfig")."""
    for f in dataclasses.fields(RunConfig):
        if f.name not in source:
            continue
        value = source._get_node(f.name)
        origin = typing.get_origin(f.type if not isinstance(f.type, str) else typing.get_type_hints(RunConfig)[f.name])
        if origin in (list, List) and not isinstance(value, ListConfig):
            example = f"{f.name}=[{_scalar(value)}]" if where == "command line" else f"{f.name}: [{_scalar(value)}]"
            raise ConfigError(f"{f.name} must be a list, not the single value {_scalar(value)!r} ({where}); "
                              f"write {example}")
        if origin in (dict, Dict) and not isinstance(value, DictConfig):
            raise ConfigError(f"{f.name} must be a mapping of key: value, not {_scalar(value)!r} ({where})")


def _scalar(node):
    return node._value() if hasattr(node, "_value") else node


def _shorthands(overrides: Sequence[str]) -> List[str]:
    """``solver=NAME`` -> ``solvers=[NAME]``; ``solver.KEY=V`` -> ``solver_options.NAME.KEY=V``
    (needs ``solver=NAME`` among the overrides)."""
    out, named = [], [item.split("=", 1)[1] for item in overrides if item.startswith("solver=")]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        if key == "solver":
            out.append(f"solvers=[{value}]")
        elif key.startswith("solver."):
            if len(named) != 1:
                raise ConfigError(f"override {item!r}: solver.KEY=VALUE sets an option of the solver named by "
                                  f"solver=NAME, which must be given once on the command line (given {len(named)} "
                                  "times); else write solver_options.NAME.KEY=VALUE")
            out.append(f"solver_options.{named[0]}.{key[len('solver.'):]}={value}")
        else:
            out.append(item)
    return out


def _explain(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    if key and "not in" in msg:
        if key.startswith("wandb."):
            return f"unknown config key {key!r}; valid: " + ", ".join(f"wandb.{f.name}" for f in dataclasses.fields(WandbConfig))
        valid = ", ".join(f.name for f in dataclasses.fields(RunConfig))
        return f"unknown config key {key!r}; valid top-level keys: {valid}"
    return f"config key {key!r}: {msg}" if key else msg


def validate(cfg: DictConfig) -> None:
    """Check names and options against the registries; raise :class:`ConfigError`."""
    try:
        resolve_problem(cfg.problem)
        for name in cfg.solvers:
            SOLVERS.get(name)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None
    if not cfg.solvers:
        raise ConfigError("solvers is empty: name at least one solver (bilevel list shows them)")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads must be >= 1 (or null for torch's default), got {cfg.threads}")
    if cfg.steps < 0 or cfg.eval_every < 1:
        raise ConfigError(f"steps must be >= 0 and eval_every >= 1, got steps={cfg.steps}, eval_every={cfg.eval_every}")
    if cfg.checkpoint_every is not None and cfg.checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every must be >= 0 (0: only at the end; null: at every evaluation), "
                          f"got {cfg.checkpoint_every}")
    if cfg.hvp_mode not in HVP_MODES:
        raise ConfigError(f"hvp_mode must be one of {list(HVP_MODES)}, got {cfg.hvp_mode!r}")
    _check_device(cfg.device)
    _check_many(cfg)
    if cfg.dtype is not None and cfg.dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype must be one of {list(DTYPE_NAMES)} (or null for the problem's default), "
                          f"got {cfg.dtype!r}")
    if not cfg.divergence_bound > 0:
        raise ConfigError(f"divergence_bound must be a positive number, got {cfg.divergence_bound}")
    problem_cls = PROBLEMS.get(cfg.problem).cls
    options = merged_problem_options(cfg.problem, cfg.preset, cfg.problem_options, cfg.dtype)
    try:
        check_options(problem_cls, options, f"problem {cfg.problem!r} (problem_options)")
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    _check_constructor_types(problem_cls, options, f"problem_options ({cfg.problem})")
    extra = sorted(set(cfg.solver_options) - set(cfg.solvers))
    if extra:
        raise ConfigError(f"solver_options has entries for {extra}, which are not in solvers {list(cfg.solvers)}")
    for name in cfg.solver_options:
        solver_options(cfg, name)  # type- and name-checks
    for name in cfg.solvers:
        build_solver(cfg, name)  # value checks (a NaN or negative step size, ...)
    if cfg.wandb.mode not in (None, "online", "offline", "disabled"):
        raise ConfigError(f"wandb.mode must be online, offline or disabled, got {cfg.wandb.mode!r}")


def _check_many(cfg: DictConfig) -> None:
    """seeds: a non-empty list of distinct integers >= 0; grid: step-size field -> non-empty list
    of positive numbers, each field a step size of at least one selected solver."""
    from .many import check_seeds, grid_points
    if cfg.get("cuda_graph") and cfg.seeds is None and not cfg.grid:
        raise ConfigError("cuda_graph=true applies to runs with seeds or grid (it captures their vmapped update); "
                          "set seeds=[...] or drop cuda_graph")
    if cfg.get("cuda_graph") and cfg.get("compile"):
        raise ConfigError("cuda_graph=true and compile=true: choose one")
    if cfg.seeds is not None:
        try:
            check_seeds(list(cfg.seeds))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if not cfg.grid:
        return
    grid = OmegaConf.to_container(cfg.grid)
    for key, values in grid.items():
        if not isinstance(values, list):
            raise ConfigError(f"grid.{key} must be a list of step sizes, e.g. grid.{key}=[0.01,0.1], got {values!r}")
        owners = [n for n in cfg.solvers if key in schedules.step_size_fields(SOLVERS.get(n).cls)]
        if not owners:
            raise ConfigError(f"grid.{key}: no selected solver has a step-size field {key!r} "
                              f"(solvers: {list(cfg.solvers)})")
    for name in cfg.solvers:
        try:
            grid_points(build_solver(cfg, name), solver_grid(cfg, name))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def solver_grid(cfg: DictConfig, name: str) -> Dict[str, list]:
    """The part of ``cfg.grid`` that applies to solver ``name`` (the fields it has)."""
    fields = set(schedules.step_size_fields(SOLVERS.get(name).cls))
    grid = OmegaConf.to_container(cfg.grid) if cfg.grid else {}
    return {k: v for k, v in grid.items() if k in fields}


def resolve_problem(name: str):
    """The registry entry of problem ``name``. A name of the form ``module:Class`` (e.g.
    ``mymodule:MyProblem``, ``pkg.problems:Ridge``) imports ``module`` (the current folder comes
    first on the path) and registers ``Class`` under that name; ConfigError when the module cannot
    be imported, has no such class, or the class is not a :class:`~bilevel.BilevelProblem`."""
    if ":" in str(name) and name not in PROBLEMS._entries:
        import importlib
        import os
        import sys

        from .problem import BilevelProblem
        module_name, _, class_name = name.partition(":")
        if not module_name or not class_name:
            raise ConfigError(f"problem {name!r}: write problem=MODULE:CLASS, e.g. problem=mymodule:MyProblem")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # ImportError, or an error inside the user's module
            raise ConfigError(f"problem {name!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); "
                              "run from the folder that holds it or add that folder to PYTHONPATH") from None
        cls = getattr(module, class_name, None)
        if cls is None:
            raise ConfigError(f"problem {name!r}: module {module_name!r} has no {class_name!r}")
        if not (isinstance(cls, type) and issubclass(cls, BilevelProblem)):
            raise ConfigError(f"problem {name!r}: {class_name} is not a subclass of bilevel.BilevelProblem")
        PROBLEMS.register(name)(cls)
    return PROBLEMS.get(name)


def default_run(problem: str, preset: Optional[str]) -> Dict[str, Any]:
    """The default run of ``problem`` at ``preset``: its class's ``RUNS[preset]`` (keys among
    solvers, solver_options, steps, eval_every), or {} (unknown problem, no such entry).

    Used by :func:`load` when the command line names a problem or a preset without a config
    file: ``bilevel run problem=cosh preset=tiny`` runs cosh's own solver set, step sizes and
    step count instead of the main job's, which are tuned for hyper-cleaning on digits.
    Explicit ``solvers=``, ``steps=``, ``solver_options.S.K=`` still override it.
    """
    if preset is None:
        return {}
    try:
        cls = resolve_problem(problem).cls
    except (KeyError, ConfigError):  # reported by validate()
        return {}
    run = dict((getattr(cls, "RUNS", None) or {}).get(preset) or {})
    unknown = sorted(set(run) - {"solvers", "solver_options", "steps", "eval_every"})
    if unknown:
        raise ConfigError(f"problem {problem!r}: RUNS[{preset!r}] has unknown key(s) {unknown}; "
                          "valid: solvers, solver_options, steps, eval_every")
    return run


def merged_problem_options(name: str, preset: Optional[str], options, dtype: Optional[str] = None) -> Dict[str, Any]:
    """The preset's options updated with ``options`` (plain containers) and the top-level
    ``dtype`` (when not None); ConfigError for an unknown preset, naming the problem's presets,
    and for a dtype given to a problem that has no dtype option."""
    if isinstance(options, DictConfig):
        options = OmegaConf.to_container(options)
    try:
        merged = preset_options(name, preset, dict(options or {}))
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None
    if dtype is not None:
        from .registry import options_of
        if "dtype" not in options_of(PROBLEMS.get(name).cls):
            raise ConfigError(f"dtype={dtype!r}: problem {name!r} has no dtype option")
        merged["dtype"] = dtype
    return merged


#: The accepted values of the top-level ``dtype`` key (each problem checks its own).
DTYPE_NAMES = ("float32", "float64", "bfloat16")


def _check_device(device) -> None:
    """ConfigError naming ``device`` when it is malformed or names a device this machine lacks."""
    from .device import resolve_device
    try:
        resolve_device(device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def problem_from_overrides(name: str, options: Dict[str, Any], preset: Optional[str] = None, device=None):
    """Build a registered problem from untrusted options, with config-style errors, on ``device``
    (None: cuda when available, else cpu)."""
    _check_device(device)
    try:
        resolve_problem(name)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None
    options = merged_problem_options(name, preset, options)
    try:
        cls = PROBLEMS.get(name).cls
        check_options(cls, dict(options), f"problem {name!r} (problem_options)")
    except (KeyError, TypeError) as exc:
        raise ConfigError(exc.args[0]) from None
    _check_constructor_types(cls, options, f"problem_options ({name})")
    typed = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(_options_schema(cls, options)), options))
    try:
        from .device import to_device
        return to_device(cls(**typed), device)
    except (TypeError, ValueError, FileNotFoundError) as exc:  # a rejected value, a missing data file
        raise ConfigError(f"problem {name!r} (problem_options): {exc}") from None


def _options_schema(cls: type, given):
    hints = typing.get_type_hints(cls if dataclasses.is_dataclass(cls) else cls.__init__)
    return dataclasses.make_dataclass(f"{cls.__name__}Options", [(k, hints.get(k, Any)) for k in given])


def _check_constructor_types(cls: type, given, label: str) -> None:
    """Type-check options against the annotations of ``cls.__init__`` (OmegaConf's rules)."""
    try:
        OmegaConf.merge(OmegaConf.structured(_options_schema(cls, given)), given)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{label}: {_explain(exc)}") from None


def solver_options(cfg: DictConfig, name: str) -> Dict[str, Any]:
    """The options for solver ``name``, type-checked against its dataclass."""
    given = cfg.solver_options.get(name, {}) or {}
    if not isinstance(given, (dict, DictConfig)):
        raise ConfigError(f"solver_options.{name} must be a mapping of option: value, got {given!r}")
    cls = SOLVERS.get(name).cls
    steps = set(schedules.step_size_fields(cls)) & set(given)
    try:
        check_options(cls, dict(given), f"solver {name!r} (solver_options.{name})")
        others = {k: v for k, v in given.items() if k not in steps}
        typed = OmegaConf.merge(OmegaConf.structured(_options_schema(cls, others)), others)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"solver_options.{name}: {_explain(exc)}") from None
    return {k: _step_size(given[k], f"solver_options.{name}.{k}") if k in steps else typed[k] for k in given}


def _step_size(value, key: str):
    """A step size from the config: a number or {value: c, decay: e} (bilevel.schedules.parse)."""
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value)
    try:
        return schedules.parse(value, key)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def build_solver(cfg: DictConfig, name: str):
    """Solver ``name`` with its options; ConfigError naming ``solver_options.NAME`` and the rule
    when a value is rejected (e.g. a NaN or negative step size)."""
    from .registry import make_solver
    try:
        return make_solver(name, **solver_options(cfg, name))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"solver_options.{name}: {exc}") from None


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)

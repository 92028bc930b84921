"""Run configuration: the embedded default job, overrides, YAML files and validation errors."""
from __future__ import annotations

import pytest
import yaml
from omegaconf import OmegaConf

from bilevel import cli
from bilevel.config import DEFAULT_JOB, ConfigError, load, solver_options, to_yaml
from bilevel.registry import PROBLEMS, SOLVERS

SMALL_QUADRATIC = ["problem=quadratic", "problem_options.dim_inner=5", "problem_options.dim_outer=3",
                   "problem_options.n_samples_inner=64", "problem_options.n_samples_outer=64"]


def default_job():
    """The embedded default job as plain data, read with PyYAML (independently of the loader)."""
    with open(DEFAULT_JOB, encoding="utf-8") as f:
        return yaml.safe_load(f)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------
# The default job


def test_embedded_default_job_is_the_base():
    job = default_job()
    cfg = load()
    assert cfg.problem == "hyperclean-digits" == job["problem"]
    solvers = list(cfg.solvers)
    assert solvers == job["solvers"]
    assert "lower-only" in solvers
    bilevel_solvers = [s for s in solvers if s != "lower-only"]
    assert len(bilevel_solvers) >= 2
    assert all(s in SOLVERS.names() for s in solvers)
    options = OmegaConf.to_container(cfg.solver_options)
    assert options == job["solver_options"]
    for name in bilevel_solvers:  # tuned step sizes, not the dataclass defaults
        assert options[name], name
        assert options[name]["upper_lr"] != SOLVERS.options(name)["upper_lr"]
    assert solver_options(cfg, "soba") == job["solver_options"]["soba"]
    assert cfg.steps == job["steps"] and cfg.eval_every == job["eval_every"] and cfg.seed == job["seed"]
    assert list(cfg.metrics) == job["metrics"]
    # schema defaults fill in what the job does not set
    assert cfg.progress is True and cfg.plot is True and cfg.wandb.enabled is False and cfg.name is None


def test_print_config_prints_yaml_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["run", f"output_dir={out}", "steps=7", "solver=soba", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = OmegaConf.to_container(load(None, [f"output_dir={out}", "steps=7", "solver=soba"]))
    assert printed == expected
    assert printed["steps"] == 7 and printed["solvers"] == ["soba"]
    assert printed["solver_options"] == {"soba": default_job()["solver_options"]["soba"]}
    assert not out.exists()


def test_to_yaml_round_trips():
    cfg = load(None, ["solver=stocbio", "steps=3"])
    assert OmegaConf.to_container(OmegaConf.create(to_yaml(cfg))) == OmegaConf.to_container(cfg)


# ---------------------------------------------------------------------------------------------
# Overrides


def test_solver_shorthand_keeps_only_that_solvers_options():
    cfg = load(None, ["solver=soba"])
    assert list(cfg.solvers) == ["soba"]
    assert OmegaConf.to_container(cfg.solver_options) == {"soba": default_job()["solver_options"]["soba"]}
    assert cfg.problem == "hyperclean-digits"


def test_solvers_list_override_drops_unselected_options():
    cfg = load(None, ["solvers=[stocbio,itd-bio]"])
    assert list(cfg.solvers) == ["stocbio", "itd-bio"]
    assert OmegaConf.to_container(cfg.solver_options) == {"stocbio": default_job()["solver_options"]["stocbio"]}
    assert solver_options(cfg, "itd-bio") == {}


def test_problem_override_drops_problem_specific_options():
    cfg = load(None, ["problem=quadratic"])
    assert cfg.problem == "quadratic"
    assert OmegaConf.to_container(cfg.problem_options) == {}
    assert OmegaConf.to_container(cfg.solver_options) == {}
    assert list(cfg.solvers) == default_job()["solvers"]


def test_problem_override_drops_the_default_jobs_metrics():
    """test_accuracy and f1 are hyper-cleaning metrics: the quadratic never reports them, so
    keeping them after ``problem=quadratic`` gives an empty table and empty plots."""
    cfg = load(None, ["problem=quadratic"])
    assert "test_accuracy" not in cfg.metrics and "f1" not in cfg.metrics


def test_solver_option_override_is_typed():
    cfg = load(None, ["solver_options.soba.upper_lr=0.05"])
    assert cfg.solver_options.soba.upper_lr == 0.05
    assert isinstance(cfg.solver_options.soba.upper_lr, float)
    opts = solver_options(cfg, "soba")
    assert opts == {**default_job()["solver_options"]["soba"], "upper_lr": 0.05}
    # the other solvers keep their tuned options
    assert OmegaConf.to_container(cfg.solver_options.stocbio) == default_job()["solver_options"]["stocbio"]
    # an int given for a float option comes out as a float; ints stay ints
    cfg = load(None, ["solver_options.soba.upper_lr=2", "solver_options.stocbio.inner_steps=3"])
    assert solver_options(cfg, "soba")["upper_lr"] == 2.0
    assert isinstance(solver_options(cfg, "soba")["upper_lr"], float)
    assert solver_options(cfg, "stocbio")["inner_steps"] == 3
    assert isinstance(solver_options(cfg, "stocbio")["inner_steps"], int)


def test_explicit_options_for_a_new_solver_are_kept():
    cfg = load(None, ["solver=itd-bio", "solver_options.itd-bio.inner_steps=4"])
    assert list(cfg.solvers) == ["itd-bio"]
    assert OmegaConf.to_container(cfg.solver_options) == {"itd-bio": {"inner_steps": 4}}


def test_top_level_overrides_are_typed():
    cfg = load(None, ["steps=12", "seed=3", "eval_every=4", "progress=false", "name=abc", "wandb.mode=offline"])
    assert (cfg.steps, cfg.seed, cfg.eval_every, cfg.progress, cfg.name) == (12, 3, 4, False, "abc")
    assert isinstance(cfg.steps, int) and cfg.wandb.mode == "offline"


def test_yaml_file_merges_with_schema_and_overrides(tmp_path):
    path = write(tmp_path / "job.yaml", """\
problem: quadratic
problem_options: {dim_inner: 5, dim_outer: 3}
solvers: [soba, aid-cg]
solver_options:
  soba: {upper_lr: 0.01}
  aid-cg: {cg_steps: 3}
steps: 30
""")
    cfg = load(path, ["steps=12", "solver_options.soba.z_lr=0.2"])
    assert cfg.problem == "quadratic"
    assert OmegaConf.to_container(cfg.problem_options) == {"dim_inner": 5, "dim_outer": 3}
    assert list(cfg.solvers) == ["soba", "aid-cg"]
    assert solver_options(cfg, "soba") == {"upper_lr": 0.01, "z_lr": 0.2}
    assert solver_options(cfg, "aid-cg") == {"cg_steps": 3}
    assert cfg.steps == 12                      # override beats the file
    assert cfg.eval_every == 50 and cfg.seed == 0  # schema defaults, not the default job
    assert list(cfg.metrics) == []              # the default job is not the base when a file is given


def test_yaml_file_with_solver_shorthand(tmp_path):
    path = write(tmp_path / "job.yaml", "problem: quadratic\nsolvers: [soba, stocbio]\n"
                                        "solver_options: {soba: {upper_lr: 0.01}, stocbio: {inner_steps: 2}}\n")
    cfg = load(path, ["solver=stocbio"])
    assert list(cfg.solvers) == ["stocbio"]
    assert OmegaConf.to_container(cfg.solver_options) == {"stocbio": {"inner_steps": 2}}


def test_missing_yaml_file(tmp_path):
    missing = tmp_path / "nope" / "job.yaml"
    with pytest.raises(ConfigError) as info:
        load(str(missing))
    assert str(missing) in str(info.value)


# ---------------------------------------------------------------------------------------------
# Errors: a ConfigError naming the culprit


@pytest.mark.parametrize("overrides, fragments", [
    (["stepz=3"], ["stepz", "steps"]),
    (["steps=abc"], ["steps", "abc"]),
    (["seed=1.5"], ["seed"]),
    (["progress=maybe"], ["progress", "maybe"]),
    (["wandb.enabled=maybe"], ["wandb.enabled"]),
    (["solver=sobaa"], ["sobaa", "did you mean", "soba", "stocbio"]),
    (["solvers=[soba,stocbioo]"], ["stocbioo", "did you mean", "stocbio"]),
    (["solvers=[]"], ["solvers"]),
    (["problem=quadratc"], ["quadratc", "quadratic", "hyperclean-digits"]),
    (["solver_options.soba.upper_lrr=1"], ["upper_lrr", "upper_lr", "z_lr"]),
    (["solver_options.soba.upper_lr=abc"], ["upper_lr", "abc"]),
    (["solver_options.stocbio.inner_steps=1.5"], ["inner_steps"]),
    (["solver_options.soba=3"], ["solver_options.soba"]),
    (["problem_options.n_trian=300"], ["n_trian", "n_train"]),
    (["problem=quadratic", "problem_options.n_train=300"], ["n_train", "quadratic", "dim_inner"]),
    (["solver=soba", "solver_options.stocbio.inner_steps=3"], ["stocbio"]),
    (["wandb.mode=onlin"], ["wandb.mode", "onlin"]),
    (["steps=-1"], ["steps", "-1"]),
    (["eval_every=0"], ["eval_every"]),
    (["steps"], ["steps", "key=value"]),
])
def test_invalid_overrides(overrides, fragments):
    with pytest.raises(ConfigError) as info:
        load(None, overrides)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.parametrize("option", ["dim_inner=abc", "n_samples_inner=1.5"])
def test_problem_option_types_are_checked(option):
    """The config promises name *and* type checks; a string for an int option is a ConfigError."""
    with pytest.raises(ConfigError) as info:
        load(None, [*SMALL_QUADRATIC, f"problem_options.{option}"])
    assert option.split("=")[0] in str(info.value)


def test_solver_options_for_unselected_solver_in_yaml(tmp_path):
    path = write(tmp_path / "job.yaml", "problem: quadratic\nsolvers: [soba]\n"
                                        "solver_options: {soba: {upper_lr: 0.01}, aid-cg: {cg_steps: 3}}\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert "aid-cg" in str(info.value) and "solvers" in str(info.value)


@pytest.mark.parametrize("text, fragments", [
    ("problem: quadratic\nsolvers: [soba]\nstepz: 3\n", ["stepz"]),
    ("problem: quadratic\nsolvers: [sobba]\n", ["sobba", "soba"]),
    ("problem: quadratic\nsolvers: [soba]\nsolver_options: {soba: {upper_lr: fast}}\n", ["upper_lr", "fast"]),
    ("problem: quadratic\nsolvers: [soba]\nwandb: {mode: loud}\n", ["wandb.mode", "loud"]),
])
def test_invalid_yaml_files(tmp_path, text, fragments):
    path = write(tmp_path / "job.yaml", text)
    with pytest.raises(ConfigError) as info:
        load(path)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_registries_know_the_documented_names():
    assert set(SOLVERS.names()) >= {"aid-cg", "itd-bio", "lower-only", "soba", "stocbio"}
    assert set(PROBLEMS.names()) >= {"quadratic", "hyperclean-digits"}


def test_unknown_wandb_key_lists_the_wandb_keys():
    with pytest.raises(ConfigError) as info:
        load(None, ["wandb.projekt=x"])
    assert "wandb.projekt" in str(info.value) and "wandb.project" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Problem presets


def test_preset_supplies_problem_options_and_explicit_options_win(tmp_path):
    from bilevel.experiment import run_experiment
    from bilevel.problems.quadratic import Quadratic

    cfg = load(None, ["problem=quadratic", "preset=tiny", "problem_options.dim_inner=4", "solver=soba", "steps=2",
                      "eval_every=1", "progress=false", "plot=false", f"output_dir={tmp_path}"])
    assert cfg.preset == "tiny"
    outcome = run_experiment(cfg, echo=lambda *a: None)
    # dim_inner comes from the override, dim_outer from the preset (the problem default is 100).
    assert Quadratic.PRESETS["tiny"]["dim_outer"] == 3
    result = outcome.outcomes["soba"]
    assert [t.shape for t in result.x.values()] == [(3,)]
    assert [t.shape for t in result.y.values()] == [(4,)]


def test_unknown_preset_names_the_problem_and_its_presets():
    with pytest.raises(ConfigError, match=r"problem 'quadratic' has no preset 'huge'.*paper, tiny"):
        load(None, ["problem=quadratic", "preset=huge"])


def test_preset_options_are_type_checked_like_explicit_ones():
    with pytest.raises(ConfigError, match="dim_inner"):
        load(None, ["problem=quadratic", "preset=tiny", "problem_options.dim_inner=abc"])


def test_changing_the_problem_drops_the_base_preset(tmp_path):
    path = write(tmp_path / "job.yaml", "problem: quadratic\npreset: tiny\nsolvers: [soba]\n")
    assert load(path, []).preset == "tiny"
    assert load(None, ["problem=cosh"]).preset is None


def test_make_problem_with_preset():
    from bilevel.registry import make_problem

    problem = make_problem("hpo", preset="tiny", n_test=50)
    assert (problem.n_train, problem.n_val, problem.n_test) == (100, 100, 50)
    with pytest.raises(KeyError, match="no preset 'nope'"):
        make_problem("hpo", preset="nope")


def test_threads_setting(tmp_path, monkeypatch):
    import torch

    from bilevel.experiment import run_experiment

    with pytest.raises(ConfigError, match="threads must be >= 1"):
        load(None, ["threads=0"])
    assert load(None, []).threads == 1  # the default: one thread (issue 9, item 6)
    assert load(None, ["threads=null"]).threads is None
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    cfg = load(None, [*SMALL_QUADRATIC, "solver=soba", "steps=1", "threads=1", "progress=false", "plot=false",
                      f"output_dir={tmp_path}"])
    run_experiment(cfg, echo=lambda *a: None)
    assert calls == [1]

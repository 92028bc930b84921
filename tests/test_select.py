"""``bilevel select`` end to end on the tiny preset: every method, the run folder, resuming, the CLI."""
import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("bilevel.problems.data_selection")  # the bliss branch's problem, solver and models

from bilevel.cli import main
from bilevel.config import ConfigError
from bilevel.select import load_select_config, run_select

TINY = ["preset=tiny", "data=builtin", "max_documents=60", "max_sequences=120", "warmup_steps=4",
        "proxy_warmup_steps=4", "round_steps=4", "eval_every=2", "bilevel_steps=2", "mates_probes=6",
        "mates_epochs=1", "influence_probes=6", "batch_size=4", "progress=false",
        "solver_options.inner_steps=1", "solver_options.z_steps=1"]


def config(tmp_path, *extra):
    return load_select_config(None, [*TINY, f"output_dir={tmp_path}", *extra])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_method_runs_and_writes_its_round(tmp_path, capsys):
    out = run_select(config(tmp_path, "rounds=1"))
    run = tmp_path / "select"
    table = capsys.readouterr().out
    for method in ("bliss", "random", "full", "dsir", "perplexity", "mates"):
        assert f"| {method} |" in table
        rdir = run / "seed0" / method / "round1"
        report = json.loads((rdir / "report.json").read_text())
        scores = np.load(rdir / "scores.npy")
        selected = read_jsonl(rdir / "selected.jsonl")
        n = report["pool"]
        k = n if method == "full" else int(np.floor(0.2 * n))
        assert report["selected"] == len(selected) == k and len(scores) == n
        # the kept sequences are the k best scores, best first, with provenance and text
        assert [s["index"] for s in selected] == np.lexsort((np.arange(n), -scores))[:k].tolist()
        assert all(s["text"] and s["source"] and "noise" in s for s in selected)
        assert np.isfinite(report["val_cloze_loss"]) and report["ppl_in"] > 1
        assert 0 <= report["auroc"] <= 1 and 0 <= report["noise_selected"] <= 1
        assert (rdir / "state.pt").is_file() and (rdir / "curve.json").is_file()
    assert set(out["finals"]) == {"bliss", "random", "full", "dsir", "perplexity", "mates"}
    assert out["finals"]["random"][0]["steps_to_match"] is not None  # random reaches its own final loss
    assert (run / "table.md").read_text().strip() == out["table"].strip()
    assert (run / "seed0" / "curves.png").is_file()
    curves = json.loads((run / "seed0" / "curves.json").read_text())
    assert [p["step"] for p in curves["random"]] == [0, 2, 4]  # eval_every=2 over round_steps=4
    bilevel = json.loads((run / "seed0" / "bliss" / "round1" / "report.json").read_text())
    assert bilevel["score_std"] > 0  # the score model does not give every sequence the same score


def test_resume_keeps_finished_rounds_and_redoes_the_missing_one(tmp_path):
    c = config(tmp_path, "rounds=2", "methods=[random,perplexity]")
    run_select(c)
    rdir = tmp_path / "select" / "seed0" / "perplexity"
    first = (rdir / "round1" / "report.json").read_text()
    second = json.loads((rdir / "round2" / "report.json").read_text())
    stamp = (rdir / "round1" / "report.json").stat().st_mtime_ns
    (rdir / "round2" / "report.json").unlink()  # interrupted during round 2
    run_select(c)
    assert (rdir / "round1" / "report.json").stat().st_mtime_ns == stamp  # not redone
    assert (rdir / "round1" / "report.json").read_text() == first
    again = json.loads((rdir / "round2" / "report.json").read_text())
    for key in ("val_cloze_loss", "ppl_in", "noise_selected", "auroc"):  # redone from the same state: same numbers
        assert again[key] == pytest.approx(second[key], rel=1e-5, nan_ok=True)
    with pytest.raises(ConfigError, match=r"other settings \(fraction: 0.2 -> 0.3\)"):
        run_select(config(tmp_path, "rounds=2", "methods=[random,perplexity]", "fraction=0.3"))


def test_user_files_through_the_pipeline(tmp_path):
    rng = np.random.default_rng(0)
    words = "the river ran past the old mill and the miller sang of grain and rain".split()
    pool = tmp_path / "pool.jsonl"
    with open(pool, "w") as f:
        for i in range(40):
            text = " ".join(rng.choice(words, size=40))
            f.write(json.dumps({"id": f"d{i}", "source": "a" if i % 2 else "b", "text": text}) + "\n")
    val = tmp_path / "val.jsonl"
    with open(val, "w") as f:
        for i in range(6):
            f.write(json.dumps({"context": " ".join(rng.choice(words, size=12)), "target": "grain"}) + "\n")
    out = run_select(config(tmp_path, "data=files", f"pool=[{pool}]", f"validation={val}", "methods=[random,dsir]",
                            "rounds=1", "vocab_size=300"))
    rep = out["finals"]["dsir"][0]
    assert rep["pool"] >= 40 and rep["source_pool/a"] == pytest.approx(0.5, abs=0.1)
    assert np.isnan(rep["noise_ratio"])  # user data carries no planted noise


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="methods"):
        load_select_config(None, ["methods=[bliss,oracle]"])
    with pytest.raises(ConfigError, match="fraction"):
        load_select_config(None, ["fraction=1.5"])
    with pytest.raises(ConfigError, match="roundz"):
        load_select_config(None, ["roundz=3"])
    with pytest.raises(ConfigError, match="data=files needs pool"):
        load_select_config(None, ["data=files"])


def test_cli_select_print_config_and_bad_input(capsys):
    assert main(["select", "--print-config", "rounds=3"]) == 0
    assert "rounds: 3" in capsys.readouterr().out
    assert main(["select", "fraction=0"]) == 2
    assert "fraction" in capsys.readouterr().err


@pytest.mark.slow  # W&B's service start-up
def test_wandb_logs_each_method_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_select(config(tmp_path, "rounds=1", "methods=[random]", "wandb=true"))
    runs = list((tmp_path / "select" / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_comparison_table_is_mean_and_sample_std_over_seeds():
    from bilevel.select import comparison_table
    table = comparison_table({"random": [{"val_cloze_loss": 4.0, "steps_to_match": 10},
                                         {"val_cloze_loss": 5.0, "steps_to_match": 30}],
                              "bliss": [{"val_cloze_loss": 3.0, "steps_to_match": None},
                                        {"val_cloze_loss": "nan", "steps_to_match": 20}]})  # nan as JSON keeps it
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[2:]}
    assert rows["random"][0] == "4.5 ± 0.71"  # std with ddof=1: sqrt(0.5)
    assert rows["random"][-1] == "20 ± 14 (2/2)"
    assert rows["bliss"][0] == "3" and rows["bliss"][-1] == "20 (1/2)"  # nan and None left out, and counted
    assert rows["bliss"][1] == "-"


def test_bliss_starts_every_round_from_the_warm_up_proxy(tmp_path):
    """BLISS's official code reloads the proxy's warm-up checkpoint every round; carrying the
    round's end proxy over (``carry_proxy``, an ablation) made round 2 relapse."""
    import torch
    c = config(tmp_path, "rounds=2", "methods=[bliss]")
    run_select(c)
    seed_dir = tmp_path / "select" / "seed0"
    warm = torch.load(seed_dir / "warmup.pt", weights_only=False)["proxy"]
    for r in (1, 2):
        proxy = torch.load(seed_dir / "bliss" / f"round{r}" / "state.pt", weights_only=False)["proxy"]
        assert all(torch.equal(proxy[k], warm[k]) for k in warm)
    run_select(config(tmp_path, "rounds=1", "methods=[bliss]", "carry_proxy=true", "name=carried"))
    carried = torch.load(tmp_path / "carried" / "seed0" / "bliss" / "round1" / "state.pt", weights_only=False)["proxy"]
    assert not all(torch.equal(carried[k], warm[k]) for k in warm)  # the bilevel phase moved the proxy


def _bliss_rounds_x0_and_x(tmp_path, monkeypatch, *extra):
    """Run 2 BLISS rounds; per round, the score model the bilevel phase starts from (x0) and
    the one it ends with (x, the one that scores the pool)."""
    from bilevel.problems import selection_bliss
    starts, ends = [], []
    build, score_with = selection_bliss.build_problem, selection_bliss.score_with

    def recording_build(inputs, score_params=None):
        starts.append({k: v.detach().clone() for k, v in score_params.items()})
        return build(inputs, score_params)

    def recording_score_with(score, params, tokens, mask):
        ends.append({k: v.detach().clone() for k, v in params.items()})
        return score_with(score, params, tokens, mask)

    monkeypatch.setattr(selection_bliss, "build_problem", recording_build)
    monkeypatch.setattr(selection_bliss, "score_with", recording_score_with)
    run_select(config(tmp_path, "rounds=2", "methods=[bliss]", *extra))
    assert len(starts) == len(ends) == 2
    return starts, ends


def _equal(a, b):
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bliss_keeps_the_score_model_across_rounds_by_default(tmp_path, monkeypatch):
    """BLISS's official code: round 1's score model starts from the warm-up proxy (backbone
    copied, fresh head), round r >= 2's from the score model round r - 1 ended with."""
    import torch
    assert load_select_config(None, []).keep_score_model is True
    starts, ends = _bliss_rounds_x0_and_x(tmp_path, monkeypatch)
    assert not _equal(starts[0], ends[0])  # the bilevel phase moved the score model
    assert _equal(starts[1], ends[0])  # round 2 starts where round 1 ended
    # round 1: the warm-up proxy's backbone (the bilevel phase of round 1 starts from it)
    warm = torch.load(tmp_path / "select" / "seed0" / "warmup.pt", weights_only=False)["proxy"]
    assert all(torch.equal(v, warm["gpt_neox." + k[len("backbone."):]])
               for k, v in starts[0].items() if k.startswith("backbone."))
    saved = torch.load(tmp_path / "select" / "seed0" / "bliss" / "round1" / "state.pt", weights_only=False)
    assert _equal(saved["state"]["score"], ends[0])  # kept in state.pt, so a resumed run keeps it too


def test_bliss_fresh_score_model_ablation_reinitialises_it_every_round(tmp_path, monkeypatch):
    """``keep_score_model=false``: every round's score model is fresh from the round's starting
    proxy (here the warm-up proxy), the head drawn from the round's seed."""
    import torch
    starts, ends = _bliss_rounds_x0_and_x(tmp_path, monkeypatch, "keep_score_model=false")
    assert not _equal(starts[1], ends[0])
    warm = torch.load(tmp_path / "select" / "seed0" / "warmup.pt", weights_only=False)["proxy"]
    for start in starts:
        assert all(torch.equal(v, warm["gpt_neox." + k[len("backbone."):]])
                   for k, v in start.items() if k.startswith("backbone."))
    assert not torch.equal(starts[0]["head.weight"], starts[1]["head.weight"])  # each round's own seed
    saved = torch.load(tmp_path / "select" / "seed0" / "bliss" / "round1" / "state.pt", weights_only=False)
    assert "score" not in saved["state"]


def test_keep_score_model_rejects_a_non_boolean(tmp_path):
    with pytest.raises(ConfigError, match="keep_score_model"):
        config(tmp_path, "keep_score_model=sometimes")


def test_bilevel_phase_takes_the_dtype_option(tmp_path, monkeypatch):
    """``problem_options.dtype=bfloat16`` reaches the round's data-selection problem (its
    forward passes under bf16 autocast); an option select does not pass is refused by name."""
    from bilevel.problems import selection_bliss
    built = []
    build = selection_bliss.build_problem

    def recording_build(inputs, score_params=None):
        built.append(build(inputs, score_params))
        return built[-1]

    monkeypatch.setattr(selection_bliss, "build_problem", recording_build)
    run_select(config(tmp_path, "rounds=1", "methods=[bliss]", "problem_options.dtype=bfloat16"))
    import torch
    assert [p.autocast for p in built] == [torch.bfloat16]
    with pytest.raises(ValueError, match="lower_lr"):
        run_select(config(tmp_path, "rounds=1", "methods=[bliss]", "problem_options.lower_lr=0.1", "name=bad"))

"""``bilevel select [CONFIG.yaml] [key=value ...]``: BLISS's data-selection rounds, with baselines.

BLISS (Hao et al., "A Lightweight Bilevel Influence Scoring Method for Data Selection in Language
Model Pretraining", ICML 2026, arXiv:2510.06048) copies MATES's staged loop (Yu, Das, Xiong,
NeurIPS 2024). Per seed:

1. data: the offline text pool (``data=text-pool``; planted noise, provenance, disjoint splits)
   or the user's files (``data=files pool=[...] validation=...``), a byte-level BPE trained on
   pool + validation text (or ``tokenizer=PATH``), the pool cut into ``seq_len`` sequences;
2. warm-up: the target and the proxy LMs (GPT-NeoX presets) trained ``warmup_steps`` on random
   pool sequences; this checkpoint is the shared start of every method;
3. for each method and round r = 1..rounds: score every pool sequence (BLISS: the bilevel phase
   then the score model; baselines: see :mod:`bilevel.problems.selection_methods`), keep the top
   ``fraction`` (the full pool for ``full``), train the target ``round_steps`` steps at
   ``target_lr * 0.5**(r-1)`` (BLISS's ``pretrain.py`` halves it each round) on the selection,
   evaluating the validation cloze loss every ``eval_every`` steps, then the round's metrics.

Every method spends the same token budget (rounds x round_steps x batch_size x seq_len) from the
same warm-up checkpoint. The run folder (``output_dir/name``) holds ``config.yaml``, the
tokenizer, ``seed<k>/warmup.pt`` and, per ``seed<k>/<method>/round<r>/``: ``selected.jsonl`` (id,
document, source, noise label, score and text of every kept sequence), ``scores.npy``,
``curve.json``, ``report.json`` (written last: a round is complete when it exists) and
``state.pt`` (the target, the method's state), ``seed<k>/curves.json`` and ``curves.png``; then
``report.json`` and ``table.md`` (mean +- std over seeds) at the top. Run the same command again to resume: finished rounds are loaded,
the first missing one is redone.

Under torchrun (``torchrun --nproc_per_node=N -m bilevel select ...``, gloo: the study runs on the
CPU) every rank runs the whole study; only rank 0 writes files (:func:`bilevel.distributed.is_main`)
and whether a file exists (resume, the tokenizer, ``warmup.pt``) is rank 0's answer, broadcast, so
every rank takes the same branch (a resumed folder must be on a file system every rank reads).
BLISS's bilevel phase is data parallel through the oracles, and so is the target / proxy LM
training (warm-up and rounds, :func:`bilevel.problems.selection_train.train_lm`: each rank its
slice of the global batch, gradients all-reduced); the scores of every method are rank 0's,
broadcast, so every rank keeps the same selection. MATES, the baselines, the influence probes and
the evaluations are not data parallel: every rank computes them whole, identically (same seeds,
same data, deterministic CPU kernels). Parameters stay replicated (no FSDP in ``select``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import distributed
from .config import ConfigError

__all__ = ["SelectConfig", "load_select_config", "run_select", "comparison_table"]


@dataclass
class SelectConfig:
    #: "text-pool" (the fetched offline pool of bilevel.problems.data.text_pool: Wikipedia, Lee news,
    #: BBE Bible; `bilevel data fetch NAME`), "builtin" (the standard library's pydoc topics and
    #: module docstrings, no fetch), "files" (your own files) or "auto" (text-pool when its
    #: sources are available, else builtin).
    data: str = "auto"
    #: data=files: pool files (jsonl / json / parquet / csv / txt), the validation file (a cloze
    #: table with context/target columns, or documents cut into cloze passages), optional tests.
    pool: List[str] = field(default_factory=list)
    validation: Optional[str] = None
    test_in: Optional[str] = None
    test_out: Optional[str] = None
    text_column: str = "text"
    #: data=text-pool: the planted-noise rate and the number of held-out validation articles.
    noise_rate: float = 0.2
    val_articles: int = 10
    #: Keep at most this many pool documents / sequences (None: all): small studies.
    max_documents: Optional[int] = 240
    max_sequences: Optional[int] = 600
    #: Held-out test documents per test set and evaluation sequences per set (seeded subsamples;
    #: None: all; the out-of-domain Bible alone is ~30k tiny-preset sequences).
    max_test_documents: Optional[int] = 80
    max_eval_sequences: Optional[int] = 256
    #: A local tokenizer (tokenizer.json or a directory); None: train a BPE of vocab_size.
    tokenizer: Optional[str] = None
    #: Model preset of bilevel.problems.language_model ("tiny", "cpu", "gpu").
    preset: str = "tiny"
    vocab_size: Optional[int] = None
    seq_len: Optional[int] = None
    methods: List[str] = field(default_factory=lambda: ["bliss", "random", "full", "dsir", "perplexity", "mates"])
    seeds: List[int] = field(default_factory=lambda: [0])
    rounds: int = 2
    fraction: float = 0.2
    #: None: deterministic top-k; > 0: Gumbel top-k at this temperature.
    temperature: Optional[float] = None
    batch_size: int = 8
    warmup_steps: int = 40
    proxy_warmup_steps: int = 40
    round_steps: int = 30
    target_lr: float = 2e-3
    proxy_lr: float = 2e-3
    eval_every: int = 10
    #: BLISS: outer steps per round, options of the bliss solver and of the data-selection problem.
    bilevel_steps: int = 60
    #: the bliss solver's defaults suit BLISS's 160M proxy. Tiny models need a larger upper step
    #: (with 1e-4 the score head moves ~1e-2 in 60 steps and the selection is that of its random
    #: init) and a slow proxy: at lower_lr 1e-3 the 300 lower steps of a round move the proxy so far
    #: that its one-step influence ranking at the end correlates only ~0.3 with the start's and the
    #: score chases a moving target (noise kept at 1.0-1.4x its base rate); at 1e-4 that correlation
    #: is ~0.94 and the selection keeps 0.46x the base rate (experiments/README.md, BLISS section).
    solver_options: Dict[str, Any] = field(default_factory=lambda: {"upper_lr": 0.01, "lower_lr": 1e-4})
    problem_options: Dict[str, Any] = field(default_factory=dict)
    #: Keep the score model across rounds, as BLISS's official code: round 1 starts it from the
    #: warm-up proxy (backbone copied, fresh head), rounds >= 2 from the score model the previous
    #: round ended with. False (an ablation): re-initialised from the proxy every round. Measured on
    #: the tiny preset (3 seeds, experiments/README.md, BLISS section): keeping it left 0.114 noise
    #: in the final selection (AUROC 0.81) against 0.175 (0.70) re-initialised.
    keep_score_model: bool = True
    #: Start each round's bilevel phase from the proxy the previous one ended with (an ablation).
    #: False: from the warm-up proxy every round, as BLISS's official code; carrying it made round 2
    #: relapse on the tiny preset (noise at 1.41x, 2.32x its base rate at seeds 1, 2; 0.61x, 0.76x
    #: without; experiments/README.md, BLISS section).
    carry_proxy: bool = False
    #: MATES: probed sequences, regression epochs and learning rate.
    mates_probes: int = 48
    mates_epochs: int = 4
    mates_lr: float = 1e-3
    #: Pool sequences on which each method's scores are correlated with one-step influence
    #: (report: influence_spearman; influence_auroc, how well the oracle itself separates noise).
    influence_probes: int = 48
    #: None: the data-selection package when installed, else our DSIR; True / False force it.
    dsir_package: Optional[bool] = None
    output_dir: str = "results"
    name: str = "select"
    progress: bool = True
    wandb: bool = False
    wandb_project: str = "bilevel-select"


DATA = ("auto", "text-pool", "builtin", "files")
TEXT_POOL_SOURCES = ("enwiki-shortened", "lee-background", "bible-bbe", "bible-asv")


def resolved_data(c: "SelectConfig") -> str:
    """``c.data`` with "auto" resolved: "text-pool" when every fetched source is available."""
    if c.data != "auto":
        return c.data
    from .problems.data import fetch
    ok = all(fetch.status(name) in ("cached", "installed") for name in TEXT_POOL_SOURCES)
    return "text-pool" if ok else "builtin"


def load_select_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> SelectConfig:
    """The config: defaults, then the YAML file, then ``key=value`` overrides; checked."""
    try:
        cfg = OmegaConf.structured(SelectConfig)
        if path is not None:
            if not os.path.isfile(path):
                raise ConfigError(f"config file {path!r} not found")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"expected key=value overrides, got {bad}")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
        raise ConfigError(f"bilevel select: invalid setting {key!r}: {str(exc).splitlines()[0]}; valid keys: "
                          f"{[f.name for f in dataclasses.fields(SelectConfig)]}") from None
    config = SelectConfig(**OmegaConf.to_container(cfg, resolve=True))
    check_select_config(config)
    return config


def check_select_config(c: SelectConfig) -> None:
    from .problems.selection_methods import METHODS
    if c.data not in DATA:
        raise ConfigError(f"data={c.data!r}: must be one of {DATA}")
    if c.data == "files" and (not c.pool or c.validation is None):
        raise ConfigError("data=files needs pool=[FILE,...] and validation=FILE (a cloze table with "
                          "context/target columns, or documents)")
    unknown = [m for m in c.methods if m not in METHODS]
    if unknown or not c.methods:
        raise ConfigError(f"methods={list(c.methods)}: each must be one of {list(METHODS)}")
    if not 0 < c.fraction <= 1:
        raise ConfigError(f"fraction={c.fraction!r}: must be in (0, 1]")
    if c.temperature is not None and not c.temperature > 0:
        raise ConfigError(f"temperature={c.temperature!r}: must be > 0 (or null for top-k)")
    for key in ("rounds", "batch_size", "round_steps", "eval_every"):
        if getattr(c, key) < 1:
            raise ConfigError(f"{key}={getattr(c, key)!r}: must be >= 1")
    for key in ("warmup_steps", "proxy_warmup_steps", "bilevel_steps", "mates_probes", "influence_probes"):
        if getattr(c, key) < 0:
            raise ConfigError(f"{key}={getattr(c, key)!r}: must be >= 0")
    if not c.seeds:
        raise ConfigError("seeds: give at least one seed")
    if c.preset not in ("tiny", "cpu", "gpu"):
        raise ConfigError(f"preset={c.preset!r}: must be one of ['tiny', 'cpu', 'gpu']")


# -- data ---------------------------------------------------------------------------------------

@dataclass
class Data:
    tokenizer: Any
    pool: Any  # Sequences
    pool_texts: List[str]
    validation: Any  # Sequences (cloze)
    validation_texts: List[str]
    test_in: Any
    test_out: Any
    test_cloze: Any
    splits: Any = None  # the TextSplits (pool subsampled)
    tokenizer_path: Optional[str] = None


def _splits(c: SelectConfig, seed: int):
    data = resolved_data(c)
    if data == "builtin":
        from .problems.data.text_pool import make_splits
        from .problems.data_selection import builtin_documents
        return make_splits(builtin_documents(), seed, noise_rate=c.noise_rate, val_articles=c.val_articles,
                           validation_source="pydoc-topics", out_of_domain=("stdlib-docstrings",), cloze_words=30)
    if data == "files":
        from .problems.data.user_pool import load_user_pool
        return load_user_pool(list(c.pool), c.validation, c.test_in, c.test_out, text_column=c.text_column)
    from .problems.data.text_pool import load_text_pool
    return load_text_pool(seed, noise_rate=c.noise_rate, val_articles=c.val_articles)


def _subsample(docs, limit: Optional[int], seed: int):
    if limit is None or len(docs) <= limit:
        return list(docs)
    keep = np.sort(np.random.default_rng(seed).choice(len(docs), size=limit, replace=False))
    return [docs[i] for i in keep]


def prepare_data(c: SelectConfig, seed: int, run_dir: Path) -> Data:
    """Splits, tokenizer (trained on pool + validation text only, saved in the run folder) and
    sequences. The pool is subsampled to ``max_documents`` documents (seeded) before packing."""
    from .problems.data.text_pool import cloze_passages
    from .problems.data.tokenizer import load_tokenizer, pack_cloze, pack_documents, train_tokenizer, training_texts
    from .problems.language_model import PRESETS
    splits = _splits(c, seed)
    splits.pool = _subsample(splits.pool, c.max_documents, seed)
    splits.test_in = _subsample(splits.test_in, c.max_test_documents, seed + 2)
    splits.test_out = _subsample(splits.test_out, c.max_test_documents, seed + 3)
    preset = PRESETS[c.preset]
    seq_len = int(c.seq_len or preset["seq_len"])
    tok_path = run_dir / f"seed{seed}" / "tokenizer.json"
    if c.tokenizer is not None:
        tokenizer = load_tokenizer(c.tokenizer)
    elif _exists(tok_path):
        tokenizer = load_tokenizer(tok_path)
    else:
        tokenizer = train_tokenizer(training_texts(splits), int(c.vocab_size or preset["vocab_size"]))
        if distributed.is_main():
            tok_path.parent.mkdir(parents=True, exist_ok=True)
            tokenizer.save(tok_path)
    pool = pack_documents(splits.pool, tokenizer, seq_len, min_tokens=max(2, seq_len // 4))
    if c.max_sequences is not None and len(pool) > c.max_sequences:
        keep = np.sort(np.random.default_rng(seed + 1).choice(len(pool), size=c.max_sequences, replace=False))
        pool = pool.subset(keep.tolist())
    texts = [tokenizer.decode(pool.tokens[i][pool.mask[i]].tolist()) for i in range(len(pool))]
    validation = pack_cloze(splits.validation, tokenizer, seq_len)
    val_texts = [f"{p.context} {p.target}" for p in splits.validation]

    def capped(seqs, salt):
        if seqs is None or c.max_eval_sequences is None or len(seqs) <= c.max_eval_sequences:
            return seqs
        keep = np.random.default_rng(seed + salt).choice(len(seqs), size=c.max_eval_sequences, replace=False)
        return seqs.subset(np.sort(keep).tolist())

    def docs_or_none(docs, salt):
        return capped(pack_documents(docs, tokenizer, seq_len, min_tokens=2), salt) if docs else None
    held = [p for d in splits.test_in for p in cloze_passages(d, words=min(60, seq_len // 2), max_passages=2)]
    return Data(tokenizer, pool, texts, validation, val_texts, docs_or_none(splits.test_in, 5),
                docs_or_none(splits.test_out, 6), capped(pack_cloze(held, tokenizer, seq_len), 7) if held else None,
                splits, str(c.tokenizer if c.tokenizer is not None else tok_path))


def eval_sets(d: Data) -> Dict[str, tuple]:
    sets = {"val_cloze": ("cloze", d.validation.tokens, d.validation.mask)}
    if d.test_cloze is not None:
        sets["test_cloze"] = ("cloze", d.test_cloze.tokens, d.test_cloze.mask)
    if d.test_in is not None:
        sets["in"] = ("perplexity", d.test_in.tokens, d.test_in.mask)
    if d.test_out is not None:
        sets["out"] = ("perplexity", d.test_out.tokens, d.test_out.mask)
    return sets


# -- models -------------------------------------------------------------------------------------

def build_models(c: SelectConfig, data: Data, seed: int):
    from .problems.language_model import build_lm, lm_config
    seq_len = data.pool.tokens.shape[1]
    vocab = data.tokenizer.vocab_size
    target = build_lm(lm_config(c.preset, "target", vocab, seq_len), seed=seed)
    proxy = build_lm(lm_config(c.preset, "proxy", vocab, seq_len), seed=seed + 100)
    return target, proxy


def _exists(path: Path) -> bool:
    """Whether ``path`` is a file, as rank 0 sees it (broadcast): every rank takes the same branch
    even while rank 0 is writing the file."""
    return bool(distributed.broadcast_object(path.is_file() if distributed.is_main() else None))


def _torch():
    import torch
    return torch


def _save(path: Path, obj) -> None:
    if not distributed.is_main():
        return
    import io
    from .checkpoint import atomic_write
    buf = io.BytesIO()
    _torch().save(obj, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())


def _write_json(path: Path, obj) -> None:
    from .checkpoint import atomic_write
    from .logging import _jsonable
    if not distributed.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(_jsonable(obj), indent=1))


def warm_up(c: SelectConfig, data: Data, seed: int, seed_dir: Path):
    """Target and proxy after ``warmup_steps`` / ``proxy_warmup_steps`` on uniformly random pool
    sequences; loaded from ``warmup.pt`` when it exists."""
    from .problems.selection_train import train_lm
    torch = _torch()
    target, proxy = build_models(c, data, seed)
    path = seed_dir / "warmup.pt"
    if _exists(path):
        saved = torch.load(path, weights_only=False)
        target.load_state_dict(saved["target"])
        proxy.load_state_dict(saved["proxy"])
        return target, proxy
    everything = torch.arange(len(data.pool))
    train_lm(target, data.pool.tokens, data.pool.mask, everything, c.warmup_steps, c.batch_size, c.target_lr,
             seed, progress="warm-up target" if c.progress else None)
    train_lm(proxy, data.pool.tokens, data.pool.mask, everything, c.proxy_warmup_steps, c.batch_size, c.proxy_lr,
             seed + 1, progress="warm-up proxy" if c.progress else None)
    _save(path, {"target": target.state_dict(), "proxy": proxy.state_dict()})
    return target, proxy


# -- one method, one seed -----------------------------------------------------------------------

def _round_metrics(scores, selected, data: Data, influence) -> Dict[str, float]:
    from .problems.selection_metrics import auroc, composition, spearman
    out = dict(composition(selected, data.pool.sources, data.pool.noise))
    out["auroc"] = auroc(scores, [bool(n) for n in data.pool.noise])
    probe, infl = influence
    if len(probe) >= 2:
        # a higher score should mean a more helpful sequence, i.e. a more negative influence
        out["influence_spearman"] = spearman(np.asarray(scores)[probe], -infl)
        # does the oracle itself tell planted noise apart (an upper bound on what influence can teach)?
        out["influence_auroc"] = auroc(-infl, [bool(data.pool.noise[i]) for i in probe])
    out["score_std"] = float(np.std(scores))
    return out


def _write_selection(path: Path, selected, scores, data: Data) -> None:
    if not distributed.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rank, i in enumerate(selected):
            i = int(i)
            f.write(json.dumps({"rank": rank, "index": i, "doc_id": data.pool.doc_ids[i],
                                "source": data.pool.sources[i], "noise": data.pool.noise[i],
                                "score": float(scores[i]), "text": data.pool_texts[i]}) + "\n")
    os.replace(tmp, path)


def run_method(c: SelectConfig, method: str, data: Data, seed: int, seed_dir: Path, logger=None):
    """The rounds of one method for one seed: ``(reports, curve)``, the per-round reports and the
    validation curve ``[{"step", "val_cloze_loss"}, ...]`` (finished rounds are read from disk)."""
    from .problems.selection_baselines import select_top
    from .problems.selection_methods import RoundInputs, influence_targets, score_pool
    from .problems.selection_train import evaluate_lm, train_lm
    torch = _torch()
    method_dir = seed_dir / method
    target, proxy = warm_up(c, data, seed, seed_dir)
    state: Dict[str, Any] = {}
    opt_state = None
    reports: List[dict] = []
    curve: List[dict] = []
    sets = eval_sets(data)
    start_eval = evaluate_lm(target, {"val_cloze": sets["val_cloze"]})
    curve.append({"step": 0, "val_cloze_loss": start_eval["val_cloze_loss"]})
    rng = np.random.default_rng(seed + 4242)
    probe = np.sort(rng.choice(len(data.pool), size=min(c.influence_probes, len(data.pool)), replace=False))
    options = {k: getattr(c, k) for k in ("mates_probes", "mates_epochs", "mates_lr", "bilevel_steps", "max_eval_sequences",
                                          "keep_score_model", "carry_proxy", "dsir_package", "batch_size",
                                          "proxy_lr")}
    options.update(solver_options=dict(c.solver_options), problem_options=dict(c.problem_options),
                   validation_texts=data.validation_texts, progress=c.progress, preset=c.preset, _data=data)
    for r in range(1, c.rounds + 1):
        rdir = method_dir / f"round{r}"
        lr = c.target_lr * 0.5 ** (r - 1)
        if _exists(rdir / "report.json") and _exists(rdir / "state.pt"):
            saved = torch.load(rdir / "state.pt", weights_only=False)
            target.load_state_dict(saved["target"])
            proxy.load_state_dict(saved["proxy"])
            state, opt_state = saved["state"], saved["optimizer"]
            reports.append(_read_report(rdir / "report.json"))
            curve = json.loads((rdir / "curve.json").read_text())
            continue
        t0 = time.time()
        inputs = RoundInputs(target, proxy, data.pool, data.validation, data.pool_texts, seed, r, lr, options, state)
        scores = np.asarray(score_pool(method, inputs), dtype=np.float64)
        scores = distributed.broadcast_object(scores)  # rank 0's: every rank keeps the same selection
        score_time = time.time() - t0
        fraction = 1.0 if method == "full" else c.fraction
        selected = select_top(scores, fraction, c.temperature, seed=1000 * seed + r)
        infl = influence_targets(target, data.pool.tokens[probe], data.pool.mask[probe], data.validation.tokens,
                                 data.validation.mask, lr) if len(probe) >= 2 else np.zeros(0)
        metrics = _round_metrics(scores, selected, data, (probe, infl))
        offset = (r - 1) * c.round_steps

        def on_eval(step):
            ev = evaluate_lm(target, {"val_cloze": sets["val_cloze"]})
            curve.append({"step": offset + step, "val_cloze_loss": ev["val_cloze_loss"]})
            if logger is not None:
                logger.on_eval({"iteration": offset + step, "val_cloze_loss": ev["val_cloze_loss"]})
        opt_state = train_lm(target, data.pool.tokens, data.pool.mask, torch.as_tensor(selected), c.round_steps,
                             c.batch_size, lr, seed=10_000 * seed + r, optimizer_state=opt_state, on_eval=on_eval,
                             eval_every=c.eval_every,
                             progress=f"{method} seed {seed} round {r}" if c.progress else None)
        metrics.update(evaluate_lm(target, sets))
        report = {"method": method, "seed": seed, "round": r, "step": r * c.round_steps, "selected": len(selected),
                  "pool": len(data.pool), "target_lr": lr, "score_seconds": score_time,
                  "seconds": time.time() - t0, **metrics}
        if distributed.is_main():
            rdir.mkdir(parents=True, exist_ok=True)
            np.save(rdir / "scores.npy", scores)
        _write_selection(rdir / "selected.jsonl", selected, scores, data)
        _write_json(rdir / "curve.json", curve)
        _save(rdir / "state.pt", {"target": target.state_dict(), "proxy": proxy.state_dict(), "state": state,
                                  "optimizer": opt_state})
        _write_json(rdir / "report.json", report)  # last: the round is complete
        if logger is not None:
            logger.on_eval({"iteration": r * c.round_steps, **{k: v for k, v in report.items()
                                                               if isinstance(v, (int, float))}})
        reports.append(report)
    return reports, curve


# -- the study ----------------------------------------------------------------------------------

TABLE_COLUMNS = (("val_cloze_loss", "val cloze loss"), ("test_cloze_loss", "test cloze loss"),
                 ("test_cloze_accuracy", "test cloze acc"), ("ppl_in", "ppl in"), ("ppl_out", "ppl out"),
                 ("noise_selected", "noise sel."), ("auroc", "AUROC"), ("influence_spearman", "Spearman infl."),
                 ("influence_auroc", "infl. AUROC"),
                 ("steps_to_match", "steps to match"))


def _number(value):
    """A report value as a float (JSON keeps nan / inf as the strings "nan" / "inf"), or None."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None if value is None or isinstance(value, bool) else float(value)


def _read_report(path: Path) -> dict:
    return {k: (_number(v) if v in ("nan", "inf", "-inf") else v) for k, v in json.loads(path.read_text()).items()}


def _mean_std(values) -> str:
    v = [x for x in map(_number, values) if x is not None and not math.isnan(x)]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.4g}"
    return f"{np.mean(v):.4g} ± {np.std(v, ddof=1):.2g}"


def comparison_table(finals: Dict[str, List[dict]], noise_pool: Optional[float] = None) -> str:
    """A markdown table of the final round per method: mean ± std over seeds (sample std)."""
    lines = ["| method | " + " | ".join(h for _, h in TABLE_COLUMNS) + " |",
             "|---|" + "---|" * len(TABLE_COLUMNS)]
    for method, reps in finals.items():
        cells = [_mean_std([r.get(k) for r in reps]) for k, _ in TABLE_COLUMNS]
        if "random" in finals and len(reps) > 1:  # how many seeds reached random's final loss at all
            reached = sum(r.get("steps_to_match") is not None for r in reps)
            cells[-1] += f" ({reached}/{len(reps)})"
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if noise_pool is not None:
        lines.append(f"\nplanted noise in the pool: {noise_pool:.3f}; steps to match: the first step at which the "
                     "method's validation cloze loss reaches random selection's final one (mean over the seeds "
                     "that reach it; (k/n): how many do)")
    return "\n".join(lines)


#: Settings that may change between a run and its resumption (they add work or change no number).
RESUMABLE_CHANGES = ("methods", "seeds", "rounds", "progress", "wandb", "wandb_project", "output_dir", "name")


def check_resumable(c: SelectConfig, run_dir: Path) -> None:
    """A run folder is resumed only with the settings it was made with (``RESUMABLE_CHANGES``
    excepted): otherwise its finished rounds would be mixed with rounds of another study."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    old = OmegaConf.to_container(OmegaConf.load(path))
    new = dataclasses.asdict(c)
    changed = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
    if changed:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
        raise ConfigError(f"{run_dir} holds a run made with other settings ({detail}); resume it with the same "
                          f"settings or choose another name= / output_dir=")


def _plot_curves(curves: Dict[str, List[dict]], path: Path, title: str) -> None:
    """Validation cloze loss against target steps, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, curve in curves.items():
        ax.plot([p["step"] for p in curve], [p["val_cloze_loss"] for p in curve], label=method)
    ax.set_xlabel("target steps after the warm-up")
    ax.set_ylabel("validation cloze loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_select(c: SelectConfig) -> Dict[str, Any]:
    """Run (or resume) the whole study; returns ``{"finals", "table", "run_dir"}`` and prints the
    table."""
    from .problems.selection_metrics import steps_to_match
    torch = _torch()
    torch.manual_seed(0)
    distributed.setup("cpu")  # under torchrun: gloo (the study runs on the CPU)
    main = distributed.is_main()
    run_dir = Path(c.output_dir) / c.name
    problem = None
    if main:  # rank 0 reads the folder (while it writes, another rank could read half a config.yaml)
        try:
            check_resumable(c, run_dir)
        except ConfigError as exc:
            problem = str(exc)
    problem = distributed.broadcast_object(problem)
    if problem:
        raise ConfigError(problem)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(c)))
    else:
        c = dataclasses.replace(c, progress=False)  # rank 0 speaks
    finals: Dict[str, List[dict]] = {m: [] for m in c.methods}
    noise_pool = None
    for seed in c.seeds:
        seed_dir = run_dir / f"seed{seed}"
        data = prepare_data(c, seed, run_dir)
        curves = {}
        for method in c.methods:
            logger = None
            if c.wandb and main:
                from .logging import WandbLogger
                logger = WandbLogger(project=c.wandb_project, name=f"{c.name}-{method}-s{seed}", group=c.name,
                                     directory=str(run_dir / "wandb"), config=dataclasses.asdict(c))
                logger.on_start({"method": method, "seed": seed})
            reports, curves[method] = run_method(c, method, data, seed, seed_dir, logger)
            final = dict(reports[-1])
            finals[method].append(final)
            noise_pool = final.get("noise_pool")
            if logger is not None:
                logger.on_end(type("R", (), {"final": final})())
        if "random" in curves:
            reference = curves["random"][-1]["val_cloze_loss"]
            for method, curve in curves.items():
                hit = steps_to_match([p["step"] for p in curve], [p["val_cloze_loss"] for p in curve], reference)
                finals[method][-1]["steps_to_match"] = hit
                finals[method][-1]["speedup_vs_random"] = (curve[-1]["step"] / hit) if hit else None
        _write_json(seed_dir / "curves.json", curves)
        if main:
            _plot_curves(curves, seed_dir / "curves.png", f"seed {seed}")
    table = comparison_table(finals, noise_pool)
    _write_json(run_dir / "report.json", finals)
    if main:
        (run_dir / "table.md").write_text(table + "\n")
        print(table)
        print(f"\nrun folder: {run_dir}")
    return {"finals": finals, "table": table, "run_dir": str(run_dir)}

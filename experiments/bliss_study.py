"""BLISS against every baseline, several seeds, plus BLISS's ablations (``bilevel select`` runs).

Hao et al., "A Lightweight Bilevel Influence Scoring Method for Data Selection in Language Model
Pretraining", ICML 2026 (arXiv:2510.06048), reduced to CPU scale: the ``tiny`` (default) or
``cpu`` model preset, the offline text pool (or the builtin standard-library text when the pool
is not fetched), planted noise at 20 %.

    python experiments/bliss_study.py [--seeds 0 1 2] [--preset tiny] [--out results/bliss_study]
                                      [key=value ...]     # extra bilevel select settings

Runs, each into its own run folder under ``--out``:

* ``main``: methods bliss, random, full, dsir, perplexity, mates; every seed;
* ablations of BLISS (method bliss only, same seeds, same warm-up as main since the warm-up is
  seeded identically): ``gamma0`` (no KL to the target: ``problem_options.gamma=0``), ``k1`` (one
  lower step per outer step: ``solver_options.inner_steps=1``), ``fresh-score`` (the score model
  re-initialised from the proxy every round: ``keep_score_model=false``; the default, as BLISS's
  official code, keeps it across rounds), ``carry-proxy`` (each round's bilevel phase starts from
  the proxy the previous one ended with instead of the warm-up proxy).

Prints the mean +- std (sample std over seeds) table of every run's final round and writes
``study.md`` and ``curves.png`` (validation cloze loss against target steps, mean over seeds,
one line per method and ablation) under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bilevel.select import comparison_table, load_select_config, run_select

ABLATIONS = {
    "gamma0": ["problem_options.gamma=0.0"],
    "k1": ["solver_options.inner_steps=1"],
    "fresh-score": ["keep_score_model=false"],
    "carry-proxy": ["carry_proxy=true"],
}


def _curves(run_dir: Path, seeds, methods):
    out = {}
    for method in methods:
        ys = []
        for seed in seeds:
            path = run_dir / f"seed{seed}" / "curves.json"
            if path.is_file():
                curve = json.loads(path.read_text()).get(method)
                if curve:
                    ys.append([p["val_cloze_loss"] for p in curve])
                    steps = [p["step"] for p in curve]
        if ys:
            n = min(len(y) for y in ys)
            out[method] = (steps[:n], np.mean([y[:n] for y in ys], axis=0))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--out", default="results/bliss_study")
    parser.add_argument("--skip-ablations", action="store_true")
    parser.add_argument("overrides", nargs="*", help="extra bilevel select key=value settings")
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(1)  # shared cores: more intra-op threads spin-wait (this study ran ~10x slower)
    out = Path(args.out)
    common = [f"preset={args.preset}", f"seeds=[{','.join(map(str, args.seeds))}]", f"output_dir={out}",
              *args.overrides]
    runs = {"main": []}
    if not args.skip_ablations:
        runs.update({name: ["methods=[bliss]", *extra] for name, extra in ABLATIONS.items()})
    finals, curves = {}, {}
    for name, extra in runs.items():
        cfg = load_select_config(None, [*common, f"name={name}", *extra])
        result = run_select(cfg)
        for method, reps in result["finals"].items():
            label = method if name == "main" else f"bliss ({name})"
            finals[label] = reps
        for method, curve in _curves(Path(result["run_dir"]), args.seeds, cfg.methods).items():
            curves[method if name == "main" else f"bliss ({name})"] = curve
    table = comparison_table(finals)
    noise = next(iter(finals.values()))[0].get("noise_pool")
    text = (f"# BLISS study ({args.preset} preset, seeds {args.seeds})\n\n{table}\n\nplanted noise in the pool: "
            f"{noise}\n")
    (out / "study.md").write_text(text)
    print("\n" + text)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, (steps, ys) in curves.items():
            ax.plot(steps, ys, label=label, linestyle="--" if label.startswith("bliss (") else "-")
        ax.set_xlabel("target training steps (after warm-up)")
        ax.set_ylabel("validation cloze loss (mean over seeds)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=120)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

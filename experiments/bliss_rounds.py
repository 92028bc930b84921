"""Why does BLISS's round 2 relapse? What changes between rounds, one thing at a time (issue 12).

``bilevel select`` with the tuned defaults keeps planted noise at about half its base rate in
round 1 but not reliably in round 2. Between the two rounds three inputs of the bilevel phase
change: the proxy (carried over from round 1's bilevel phase, where BLISS's official code
reloads the warm-up checkpoint every round), the target (trained on round 1's selection; the
KL term pulls the proxy toward it) and the round's seed (lower/upper batches and the fresh
score head). Per seed this script replays round 1 exactly as the pipeline does (same warm-up,
same seeds, same target training), then runs round 2's bilevel phase under variants that
change one input at a time:

* ``pipeline``: proxy carried over, target trained on round 1's selection (what ``bilevel select``
  does; must reproduce its round-2 ratios);
* ``proxy reset``: the warm-up proxy (BLISS's official code), trained target;
* ``warm target``: proxy carried over, the warm-up target in the KL term;
* ``round-1 inputs``: warm-up proxy and target, round 2's seed only (the seed-to-seed spread of
  round 1 itself).

Per variant: the noise ratio of the top ``fraction`` (selected noise fraction / pool's), AUROC of
the scores (clean over noise), the per-kind ratios, the Spearman correlation of the scores with
minus the one-step influence of ``--probes`` pool sequences under the variant's starting proxy,
that oracle's own AUROC and ratio, and the bilevel phase's upper-loss (validation cloze) curve.

    python experiments/bliss_rounds.py --seeds 0 1 2 [--probes 200] [--out results/bliss_rounds] [key=value ...]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bilevel.problems.data.text_pool import NOISE_KINDS
from bilevel.problems.selection_baselines import select_top
from bilevel.problems.selection_methods import RoundInputs, influence_targets, score_pool
from bilevel.problems.selection_metrics import auroc, spearman
from bilevel.problems.selection_train import train_lm
from bilevel.select import load_select_config, prepare_data, warm_up

VARIANTS = ("pipeline", "proxy reset", "warm target", "round-1 inputs")


def summary(scores, noise, fraction, probe, infl):
    scores = np.asarray(scores, dtype=np.float64)
    sel = select_top(scores, fraction)
    is_noise = np.array([bool(k) for k in noise])
    out = {"ratio": float(is_noise[sel].mean() / is_noise.mean()), "auroc": auroc(scores, is_noise.tolist()),
           "rho": spearman(scores[probe], -infl)}
    for kind in NOISE_KINDS:
        base = np.mean([k == kind for k in noise])
        out[kind] = float(np.mean([noise[i] == kind for i in sel]) / base) if base else float("nan")
    return out


def oracle(noise, probe, infl, fraction):
    """How well the one-step influence itself separates noise on the probed sequences."""
    is_noise = np.array([bool(noise[i]) for i in probe])
    sel = select_top(-infl, fraction)
    out = {"oracle_auroc": auroc(-infl, is_noise.tolist()), "oracle_ratio": float(is_noise[sel].mean() / is_noise.mean())}
    kinds = [noise[i] for i in probe]
    for kind in NOISE_KINDS:
        base = np.mean([k == kind for k in kinds])
        out[f"oracle_{kind}"] = float(np.mean([kinds[i] == kind for i in sel]) / base) if base else float("nan")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--curve-every", type=int, default=10)
    parser.add_argument("--out", default="results/bliss_rounds")
    parser.add_argument("overrides", nargs="*", help="extra bilevel select key=value settings")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        c = load_select_config(None, [f"seeds=[{seed}]", f"output_dir={args.out}", "name=run", "progress=false",
                                      *args.overrides])
        run_dir = Path(c.output_dir) / c.name
        data = prepare_data(c, seed, run_dir)
        target0, proxy0 = warm_up(c, data, seed, run_dir / f"seed{seed}")
        noise = list(data.pool.noise)
        val = data.validation
        probe = np.sort(np.random.default_rng(seed + 99).choice(len(noise), size=min(args.probes, len(noise)),
                                                               replace=False))
        base = {k: getattr(c, k) for k in ("mates_probes", "mates_epochs", "mates_lr", "bilevel_steps",
                                           "max_eval_sequences", "keep_score_model", "dsir_package", "batch_size",
                                           "proxy_lr")}
        base.update(solver_options=dict(c.solver_options), problem_options=dict(c.problem_options),
                    validation_texts=data.validation_texts, progress=False, preset=c.preset, _data=data,
                    bilevel_eval_every=args.curve_every)

        def influence(proxy):
            return influence_targets(proxy, data.pool.tokens[probe], data.pool.mask[probe], val.tokens, val.mask,
                                     c.proxy_lr)

        def phase(label, target, proxy, r):
            t0 = time.time()
            inputs = RoundInputs(target, copy.deepcopy(proxy), data.pool, val, data.pool_texts, seed, r,
                                 c.target_lr * 0.5 ** (r - 1), dict(base), {})
            infl = influence(proxy)
            scores = score_pool("bliss", inputs)
            s = {**summary(scores, noise, c.fraction, probe, infl), **oracle(noise, probe, infl, c.fraction)}
            curve = inputs.state["bilevel"][-1].get("curve", [])
            row = {"seed": seed, "variant": label, "round": r, "seconds": time.time() - t0, **s, "curve": curve}
            rows.append(row)
            f = [p["val_cloze_loss"] for p in curve]
            a = [p.get("noise_auroc", float("nan")) for p in curve]
            print(f"seed {seed} {label:16s} ratio {s['ratio']:.2f} auroc {s['auroc']:.2f} rho {s['rho']:+.2f} "
                  + " ".join(f"{k[:4]} {s[k]:.2f}" for k in NOISE_KINDS)
                  + f" | oracle auroc {s['oracle_auroc']:.2f} ratio {s['oracle_ratio']:.2f} markup {s['oracle_markup']:.2f}"
                  + (f" | upper loss {f[0]:.3f}->{min(f):.3f}->{f[-1]:.3f}, curve auroc {a[0]:.2f}->{a[-1]:.2f}"
                     if f else "") + f" ({row['seconds']:.0f} s)", flush=True)
            return scores, inputs.proxy

        scores1, proxy1 = phase("round 1", target0, proxy0, 1)
        selected = select_top(scores1, c.fraction, c.temperature, seed=1000 * seed + 1)
        target1 = copy.deepcopy(target0)
        train_lm(target1, data.pool.tokens, data.pool.mask, torch.as_tensor(selected), c.round_steps, c.batch_size,
                 c.target_lr, seed=10_000 * seed + 1)
        drift = spearman(influence(proxy0), influence(proxy1))
        print(f"seed {seed} proxy drift over round 1: Spearman(influence at warm-up, at round-1 end) {drift:+.2f}",
              flush=True)
        inputs_of = {"pipeline": (target1, proxy1), "proxy reset": (target1, proxy0),
                     "warm target": (target0, proxy1), "round-1 inputs": (target0, proxy0)}
        for label in args.variants:
            phase(label, *inputs_of[label], 2)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "rows.json").write_text(json.dumps(rows, indent=1))
    print("\n| round 2 variant | noise ratio (mean ± std) | seeds | AUROC | rho | oracle AUROC | oracle ratio | "
          + " | ".join(NOISE_KINDS) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(NOISE_KINDS))
    for label in ("round 1", *args.variants):
        rs = [r for r in rows if r["variant"] == label]

        def ms(key):
            v = np.array([r[key] for r in rs], dtype=float)
            return f"{np.nanmean(v):.2f}" + (f" ± {np.nanstd(v, ddof=1):.2f}" if len(v) > 1 else "")
        print(f"| {label} | {ms('ratio')} | " + ", ".join(f"{r['ratio']:.2f}" for r in rs)
              + f" | {ms('auroc')} | {ms('rho')} | {ms('oracle_auroc')} | {ms('oracle_ratio')} | "
              + " | ".join(ms(k) for k in NOISE_KINDS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

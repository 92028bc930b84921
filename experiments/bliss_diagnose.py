"""Why does BLISS keep planted noise? Selection-only diagnostics on the tiny preset (issue 12).

No target training: each method scores the pool once from the shared warm-up checkpoint of
``bilevel select`` (round 1's inputs), and we measure what its top ``fraction`` holds. Per seed:

* the *oracle*: the one-step influence of every pool sequence on the validation cloze loss,
  ``f(theta - lr grad CE_i) - f(theta)`` (MATES's probe; :func:`influence_targets`), under the
  proxy (what BLISS's hypergradient differentiates) and under the target; its top fraction is what
  a perfect influence-based selector would keep. If the oracle keeps noise at or above its base
  rate, the noise is not harmful *for this validation set* and no influence method (BLISS, MATES)
  can be expected to drop it;
* BLISS's bilevel phase (``bliss_round``) on a grid of ``upper_lr`` (and the proxy warm-up
  length), its top fraction's noise and the Spearman correlation of its scores with the proxy's
  influence;
* the baselines on the same inputs: random, DSIR, perplexity, MATES (on a grid of its regression
  learning rate).

    python experiments/bliss_diagnose.py --seeds 0 1 2 [--bliss upper_lr=0.01 upper_lr=0.03,z_clip=1e3 ...]
        [--proxy-warmup 40 200] [--bilevel-steps 60] [--out results/bliss_diagnose] [key=value ...]

Prints, per (setting, method): the noise fraction of the selection over the pool's (the ratio;
below 1 = noise pushed below its base rate), its noise fraction by kind, AUROC clean vs noise.
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
from bilevel.select import load_select_config, prepare_data, warm_up


def selection_summary(scores, noise, fraction, reference=None):
    """Noise ratio of the top ``fraction`` (selected noise fraction / pool noise fraction), the
    selected fraction of each noise kind, AUROC clean-over-noise and, with ``reference`` (an
    influence, negative = helps), the Spearman correlation of the scores with minus it."""
    scores = np.asarray(scores, dtype=np.float64)
    sel = select_top(scores, fraction)
    is_noise = np.array([bool(k) for k in noise])
    out = {"ratio": float(is_noise[sel].mean() / is_noise.mean()),
           "noise_sel": float(is_noise[sel].mean()),
           "auroc": auroc(scores, is_noise.tolist())}
    for kind in NOISE_KINDS:
        pool = np.mean([k == kind for k in noise])
        out[f"{kind}_ratio"] = float(np.mean([noise[i] == kind for i in sel]) / pool) if pool else float("nan")
    if reference is not None:
        out["spearman_proxy_infl"] = spearman(scores, -np.asarray(reference))
    return out


def kind_means(values, noise):
    """Mean of ``values`` per kind ("clean" and each noise kind)."""
    values = np.asarray(values)
    out = {"clean": float(values[[not k for k in noise]].mean())}
    for kind in NOISE_KINDS:
        pick = [k == kind for k in noise]
        if any(pick):
            out[kind] = float(values[pick].mean())
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bliss", nargs="+", default=["upper_lr=0.01", "upper_lr=0.03", "upper_lr=0.1"],
                        help="BLISS settings to try, each 'key=value,key=value' of bliss solver options")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--proxy-warmup", type=int, nargs="+", default=[40])
    parser.add_argument("--bilevel-steps", type=int, default=60)
    parser.add_argument("--mates-lr", type=float, nargs="+", default=[1e-3, 1e-2])
    parser.add_argument("--out", default="results/bliss_diagnose")
    parser.add_argument("overrides", nargs="*", help="extra bilevel select key=value settings")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for warm in args.proxy_warmup:
        for seed in args.seeds:
            c = load_select_config(None, [f"seeds=[{seed}]", f"output_dir={args.out}", f"name=warm{warm}",
                                          f"proxy_warmup_steps={warm}", "progress=false", *args.overrides])
            run_dir = Path(c.output_dir) / c.name
            data = prepare_data(c, seed, run_dir)
            target, proxy = warm_up(c, data, seed, run_dir / f"seed{seed}")
            noise = list(data.pool.noise)
            val = data.validation
            t0 = time.time()
            cache = run_dir / f"seed{seed}" / "influence.npz"
            if cache.is_file():
                saved = np.load(cache)
                infl_proxy, infl_target = saved["proxy"], saved["target"]
            else:
                infl_proxy = influence_targets(proxy, data.pool.tokens, data.pool.mask, val.tokens, val.mask,
                                               c.proxy_lr)
                infl_target = influence_targets(target, data.pool.tokens, data.pool.mask, val.tokens, val.mask,
                                                c.target_lr)
                np.savez(cache, proxy=infl_proxy, target=infl_target)
            print(f"[warm {warm} seed {seed}] influence of {len(noise)} sequences: {time.time() - t0:.0f} s; "
                  f"pool noise {np.mean([bool(k) for k in noise]):.3f}", flush=True)
            print("  mean influence x1e3 (negative = helps) proxy:",
                  {k: round(1e3 * v, 3) for k, v in kind_means(infl_proxy, noise).items()},
                  " target:", {k: round(1e3 * v, 3) for k, v in kind_means(infl_target, noise).items()}, flush=True)

            def record(setting, method, scores, seconds=0.0):
                s = selection_summary(scores, noise, c.fraction, infl_proxy)
                rows.append({"warm": warm, "seed": seed, "setting": setting, "method": method,
                             "seconds": seconds, **s})
                print(f"  {method:22s} {setting:26s} ratio {s['ratio']:.2f}  auroc {s['auroc']:.2f}  "
                      + " ".join(f"{k[:4]} {s[k + '_ratio']:.2f}" for k in NOISE_KINDS)
                      + f"  rho {s['spearman_proxy_infl']:+.2f}  ({seconds:.0f} s)", flush=True)

            record("proxy lr", "oracle (proxy infl.)", -infl_proxy)
            record("target lr", "oracle (target infl.)", -infl_target)
            base = {k: getattr(c, k) for k in ("mates_probes", "mates_epochs", "mates_lr", "bilevel_steps",
                                               "max_eval_sequences", "keep_score_model", "dsir_package",
                                               "batch_size", "proxy_lr")}
            base.update(solver_options=dict(c.solver_options), problem_options=dict(c.problem_options),
                        validation_texts=data.validation_texts, progress=False, preset=c.preset, _data=data)

            def inputs(**changes):
                o = dict(base, **changes)
                return RoundInputs(target, copy.deepcopy(proxy), data.pool, val, data.pool_texts, seed, 1,
                                   c.target_lr, o, {})

            for method in () if args.skip_baselines else ("random", "dsir", "perplexity"):
                t0 = time.time()
                record("-", method, score_pool(method, inputs()), time.time() - t0)
            for lr in [] if args.skip_baselines else args.mates_lr:
                t0 = time.time()
                record(f"mates_lr {lr:g}", "mates", score_pool("mates", inputs(mates_lr=lr)), time.time() - t0)
            for setting in args.bliss:
                t0 = time.time()
                opts = dict(c.solver_options)
                for item in filter(None, setting.split(",")):
                    key, value = item.split("=")
                    opts[key] = float(value) if any(ch in value for ch in ".e") else int(value)
                scores = score_pool("bliss", inputs(solver_options=opts, bilevel_steps=args.bilevel_steps))
                record(setting, "bliss", scores, time.time() - t0)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "rows.json").write_text(json.dumps(rows, indent=1))
    # mean +- std over seeds per (warm, method, setting)
    print("\n| proxy warm-up | method | setting | noise ratio (mean ± std) | per seed | AUROC | "
          + " | ".join(f"{k} ratio" for k in NOISE_KINDS) + " | Spearman vs proxy infl. |")
    print("|---|---|---|---|---|---|" + "---|" * len(NOISE_KINDS) + "---|")
    keys = []
    for r in rows:
        if (r["warm"], r["method"], r["setting"]) not in keys:
            keys.append((r["warm"], r["method"], r["setting"]))
    for warm, method, setting in keys:
        rs = [r for r in rows if (r["warm"], r["method"], r["setting"]) == (warm, method, setting)]

        def ms(key):
            v = np.array([r[key] for r in rs], dtype=float)
            return f"{np.nanmean(v):.2f}" + (f" ± {np.nanstd(v, ddof=1):.2f}" if len(v) > 1 else "")
        print(f"| {warm} | {method} | {setting} | {ms('ratio')} | "
              + ", ".join(f"{r['ratio']:.2f}" for r in rs) + f" | {ms('auroc')} | "
              + " | ".join(ms(f"{k}_ratio") for k in NOISE_KINDS) + f" | {ms('spearman_proxy_infl')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

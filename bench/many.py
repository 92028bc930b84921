"""Many seeds in one process: batched (bilevel.many, torch.func.vmap) against sequential runs.

    python bench/many.py [--seeds 16] [--steps 100] [--solvers soba bo-rep] [--threads 1]
                         [--batch-size 125 --val-batch-size 100]

For each solver, on hyperclean-digits (the default problem: 1000 noisy training samples, 64
features, 10 classes; batch sizes 125 and 100 by default, which divide the 1000 training and
300 validation samples, so that every copy's blocks have one shape and each iteration is ONE
vmapped call; with the problem's own 128 the last, smaller block makes the copies split into
groups, see bilevel.many): R seeds as R sequential ``solve(seed=s)`` calls, then as one
``solve(seeds=[...])`` with the eager vmapped update (``compile=False``) and with the compiled
one (``compile=True``, bilevel.many_compile; its compilation is done by a warm-up run first
and printed apart: the batched figure is the steady state, as the sequential runs' is after
their own warm-up); prints the wall time of each, the throughput ratios (sequential time /
batched time), and the largest deviation of the batched copies' final test accuracy from the
sequential runs'. Evaluations are few (every ``steps`` iterations) so that the figure is about
the steps. Nothing is asserted.
"""
import argparse
import math
import time

import torch

import bilevel

SETTINGS = {  # the main job's step sizes for digits hyper-cleaning (bilevel/configs/default.yaml)
    "soba": dict(upper_lr=50.0, lower_lr=0.5, z_lr=0.5),
    "bo-rep": dict(upper_lr=0.3, lower_lr=0.5, neumann_lr=0.5),
    "stocbio": dict(upper_lr=50.0, lower_lr=0.5, neumann_lr=0.5),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--solvers", nargs="+", default=["soba", "bo-rep"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="alternate the two ways this many times; min time")
    parser.add_argument("--problem", default="hyperclean-digits")
    parser.add_argument("--batch-size", type=int, default=125)
    parser.add_argument("--val-batch-size", type=int, default=100)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled batched runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    problem = bilevel.make_problem(args.problem, device="cpu", batch_size=args.batch_size,
                                   val_batch_size=args.val_batch_size)
    seeds = list(range(args.seeds))
    print(f"{args.problem} (batch {args.batch_size}, val batch {args.val_batch_size}), {args.steps} steps, {args.seeds} seeds, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}")
    print("| solver | sequential s | batched eager s | ratio | batched compiled s | ratio | compile s | "
          "max |acc diff| | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.solvers:
        options = SETTINGS.get(name, {})
        bilevel.solve(problem, name, steps=2, seed=0, **options)  # warm-up (imports, caches)
        bilevel.solve(problem, name, steps=2, seeds=seeds, compile=False, **options)
        compile_seconds = math.nan
        if not args.no_compile:  # compiles the batched update once (cached for the timed runs)
            started = time.perf_counter()
            warm = bilevel.solve(problem, name, steps=3, seeds=seeds, eval_every=3, compile=True, **options)
            compile_seconds = time.perf_counter() - started
            if not warm.compiled:
                print(f"  {name}: the batched update was not compiled ({warm.reason})")
        sequential = eager = fast = math.inf
        runs = {}
        for _ in range(args.repeats):  # alternated, min over repeats: outside load hits each alike
            started = time.perf_counter()
            lone = [bilevel.solve(problem, name, steps=args.steps, seed=s, eval_every=args.steps, **options)
                    for s in seeds]
            sequential = min(sequential, time.perf_counter() - started)
            for label, flag in (("eager", False), ("compiled", True)):
                if flag and args.no_compile:
                    continue
                started = time.perf_counter()
                runs[label] = bilevel.solve(problem, name, steps=args.steps, seeds=seeds, eval_every=args.steps,
                                            compile=flag, **options)
                took = time.perf_counter() - started
                if flag:
                    fast = min(fast, took)
                else:
                    eager = min(eager, took)
        metric = "test_accuracy" if "test_accuracy" in lone[0].final else next(
            k for k, v in lone[0].final.items() if isinstance(v, float) and k != "time")
        diff = max(abs(r.final[metric] - a.final[metric]) for batch in runs.values() for r, a in zip(batch, lone))
        note = "; ".join(f"{label}: {r.reason or r.note or ('compiled' if r.compiled else 'vmapped')}"
                         for label, r in runs.items())
        print(f"| {name} | {sequential:.2f} | {eager:.2f} | {sequential / eager:.1f}x | {fast:.2f} | "
              f"{sequential / fast:.1f}x | {compile_seconds:.0f} | {diff:.1e} | {note} |", flush=True)


if __name__ == "__main__":
    main()

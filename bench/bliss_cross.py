"""Cost of BLISS's cross term d2_xy g . z: the library's generic cross product against the
official code's per-sample formula, on the data-selection problem, measured in this process.

    python bench/bliss_cross.py [--preset tiny] [--batch 8] [--repeats 10]

The official code (MingruiLiu-ML-Lab/BLISS-Bilevel-Data-Selection, bilevel_selection.py) loops
over the B sequences of the batch: per sample, one score forward and backward (grad_x s_i) and
one proxy forward and backward (g_i = grad_y CE_i), then combines them with the softmax Jacobian

    d2_xy g . z = sum_i P_i grad s_i <g_i, z> - (sum_j P_j grad s_j)(sum_i P_i <g_i, z>).

The generic cross product (bilevel.oracles.LowerProducts.cross) is one batched double-backward
pass through grad_y g. Both are timed from scratch (the generic one builds its own gradient
graph; inside the bliss solver that graph is shared with the z steps' HVPs, so its marginal cost
there is one backward). Prints seconds, the ratio per-sample / generic, and the largest
difference between the two results. Ratios, not seconds, carry over between machines.
"""
import argparse

import torch
from timing import median_time

from bilevel import oracles
from bilevel.problems import language_model as LM
from bilevel.registry import make_problem


def per_sample_cross(problem, x, y, z, batch):
    """The official per-sample loop and softmax-Jacobian combination (+d2_xy g . z)."""
    scores, score_grads, dots = [], [], []
    for i in batch.tolist():
        t, m = problem.pool.tokens[i:i + 1], problem.pool.mask[i:i + 1]
        xl = {k: v.detach().requires_grad_(True) for k, v in x.items()}
        s = LM.scores(problem.score, xl, t, m)[0]
        score_grads.append(torch.autograd.grad(s, list(xl.values())))
        scores.append(s.detach())
        yl = {k: v.detach().requires_grad_(True) for k, v in y.items()}
        g = torch.autograd.grad(LM.sequence_ce(problem.proxy, yl, t, m)[0], list(yl.values()))
        dots.append(sum((a * z[k]).sum() for a, k in zip(g, y)))
    p = torch.softmax(torch.stack(scores), 0)
    dots = torch.stack(dots)
    mean_dot = (p * dots).sum()
    out = {}
    for j, k in enumerate(x):
        grads = torch.stack([sg[j] for sg in score_grads])
        w = p.view(-1, *[1] * (grads.dim() - 1))
        out[k] = (w * dots.view_as(w) * grads).sum(0) - (w * grads).sum(0) * mean_dot
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    problem = make_problem("data-selection", args.preset, batch_size=args.batch, warmup_steps=0)
    g = torch.Generator().manual_seed(0)
    x, y = problem.init(g)
    batch = problem.sample("lower", g)
    z = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) * 1e-2 for k, v in y.items()}

    generic = oracles.cross(problem, x, y, z, batch)
    official = per_sample_cross(problem, x, y, z, batch)
    diff = max(float((generic[k] - official[k]).abs().max()) for k in x)
    scale = max(float(generic[k].abs().max()) for k in x)

    t_generic = median_time(lambda: oracles.cross(problem, x, y, z, batch), args.repeats)
    t_loop = median_time(lambda: per_sample_cross(problem, x, y, z, batch), args.repeats)
    n_x, n_y = sum(v.numel() for v in x.values()), sum(v.numel() for v in y.values())
    print(f"data-selection preset={args.preset}: batch {args.batch} x {problem.seq_len} tokens, "
          f"dim x = {n_x:,}, dim y = {n_y:,}, torch threads 1")
    print(f"  generic cross product (one batched double backward): {t_generic * 1e3:8.1f} ms")
    print(f"  official per-sample loop + softmax Jacobian:          {t_loop * 1e3:8.1f} ms")
    print(f"  ratio per-sample / generic: {t_loop / t_generic:.2f}")
    print(f"  max |difference| {diff:.2e} (largest entry {scale:.2e})")


if __name__ == "__main__":
    main()

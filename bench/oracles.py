"""Cost of the second-order oracles relative to one gradient, measured in this process.

    python bench/oracles.py [--repeats 30]

For each model it times grad_y g, an HVP (reverse-over-reverse and forward-over-reverse), a cross
product, and hvp_and_cross (one shared double-backward pass), and prints each as a ratio to the
gradient's median time. Ratios, not seconds, are what carries over between machines.
"""
import argparse

import torch
from timing import median_time

from bilevel import oracles, tree
from bilevel.problem import FunctionProblem
from bilevel.problems.hyperclean_digits import HypercleanDigits
from bilevel.problems.quadratic import Quadratic


def mlp_problem(width=256, n=512, d=64, classes=10):
    """Lower: an MLP's cross-entropy on inputs scaled by exp(x) + L2; upper: its validation loss."""
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(d, width), torch.nn.Tanh(), torch.nn.Linear(width, classes))
    data, labels = torch.randn(n, d, generator=g), torch.randint(classes, (n,), generator=g)

    def loss(x, y, b):
        logits = torch.func.functional_call(net, y, (data * x["log_scale"].exp(),))
        return torch.nn.functional.cross_entropy(logits, labels) + 1e-3 * tree.sq_norm(y)
    y0 = {k: v.detach().clone() for k, v in net.named_parameters()}
    return FunctionProblem(loss, loss, {"log_scale": torch.zeros(d)}, y0, name=f"mlp-{d}-{width}-{classes}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    problems = [Quadratic(), HypercleanDigits(batch_size=None), mlp_problem()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratios to one grad_y g (median of {args.repeats})")
    print(f"{'problem':<24s}{'dim y':>8s}{'grad ms':>9s}{'hvp rev':>9s}{'hvp fwd':>9s}{'cross':>8s}{'hvp+cross':>11s}")
    for problem in problems:
        g = torch.Generator().manual_seed(0)
        x, y = problem.init(g)
        batch = problem.sample("lower", g)
        v = tree.map(torch.ones_like, y)
        base = median_time(lambda: oracles.grad_lower_y(problem, x, y, batch), args.repeats, warmup=3)
        ratios = [median_time(fn, args.repeats, warmup=3) / base for fn in (
            lambda: oracles.hvp(problem, x, y, v, batch, mode="reverse"),
            lambda: oracles.hvp(problem, x, y, v, batch, mode="forward"),
            lambda: oracles.cross(problem, x, y, v, batch),
            lambda: oracles.hvp_and_cross(problem, x, y, v, batch))]
        print(f"{problem.name:<24s}{tree.numel(y):>8d}{1000 * base:>9.3f}" + "".join(f"{r:>9.2f}" for r in ratios[:3])
              + f"{ratios[3]:>11.2f}")


if __name__ == "__main__":
    main()

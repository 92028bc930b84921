"""Default step sizes of the decaying-step solvers on a well-conditioned stochastic quadratic.

The benchopt quadratic with n = 256 samples per level, d_y = 10, d_x = 5, batch 64 and
mu_inner = 0.5 (lower Hessian eigenvalues in [0.5, 1]); ||grad h(x)||^2 (closed form) at x_0 and
after ``--steps`` iterations of each solver at its defaults, and at the alternatives in
VARIANTS (one seed each: the point is the order of magnitude, not a ranking).

    python bench/step_defaults.py [--steps 3000] [--solvers ttsa bsa f2sa amigo soba]
"""
import argparse

import torch

import bilevel
from bilevel.problems.quadratic import Quadratic
from bilevel.schedules import PolyDecay

#: Alternatives to the defaults, each labelled with its source.
VARIANTS = {
    "f2sa": {"benchopt quadratic best params (step 0.1, delta_lmbda 0.01)":
             dict(upper_lr=0.1, lower_lr=0.1, delta_lambda=0.01)},
    "soba": {"constant 0.1 (the former default)": dict(upper_lr=0.1, lower_lr=0.1, z_lr=0.1)},
    "ttsa": {"step 0.5 (5x), same exponents": dict(upper_lr=0.5, lower_lr=0.5)},
    "bsa": {"step 0.5 (5x), same exponents": dict(upper_lr=0.5, lower_lr=0.5)},
    "amigo": {"benchopt SOBA schedule 0.1/sqrt(t+1) on y, z, x":
              dict(upper_lr=PolyDecay(0.1, 0.5), lower_lr=PolyDecay(0.1, 0.5), z_lr=PolyDecay(0.1, 0.5))},
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--solvers", nargs="+", default=["ttsa", "bsa", "f2sa", "amigo", "soba"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    problem = Quadratic(n_samples_inner=256, n_samples_outer=256, dim_inner=10, dim_outer=5, batch_size=64,
                        mu_inner=0.5)
    for name in args.solvers:
        for label, hp in {"defaults": {}, **VARIANTS.get(name, {})}.items():
            result = bilevel.solve(problem, name, steps=args.steps, seed=0, eval_every=args.steps, **hp)
            start, end = result.history[0]["grad_norm_sq"], result.final["grad_norm_sq"]
            print(f"{name:6s} {label:60s} {start:.3g} -> {end:.3g}  ({result.wall_time:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

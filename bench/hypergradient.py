"""bilevel.hypergradient against a hand-written torch hypergradient, on the same point.

    python bench/hypergradient.py [--repeats 31] [--hvp-mode reverse|forward] [--masked-cg]

Rows: linear (ridge regression) and MLP lower levels, float64 and float32, CG and Neumann, K = 5,
10, 20 products. Both sides compute

    grad Phi = grad_x f - d2_xy g . v,      v ~ (d2_yy g)^{-1} grad_y f   (K products)

The baseline is what one writes by hand in torch: one upper backward for (grad_x f, grad_y f),
one lower forward and one create_graph gradient grad_y g, then every Hessian-vector product and
the cross product as a backward pass through that one graph (``retain_graph=True``), the CG and
Neumann loops on lists of tensors. Each row prints the median time of each side over the
repeats (interleaved, one intra-op thread), the median of the per-repeat ratios bilevel/torch
(each pair run back to back, so a change in machine load hits both), and the largest absolute
deviation between the two results. ``--hvp-mode forward`` times the library's forward-over-reverse
products against the same reverse-mode baseline; ``--masked-cg`` runs the library's CG with
``host_sync=False`` (the accelerator loop: every product computed, no host read per iteration).
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import bilevel
from bilevel import hypergrad, linear_system
from bilevel.problem import FunctionProblem

NEUMANN_LR = 0.1


def linear_problem(dtype, n=256, d=64, out=10):
    """Ridge regression: g = 1/2n ||X W - Y||^2 + 1/2 sum_j exp(x_j) ||W_j||^2 (x: one
    log-penalty per input feature); f = 1/2m ||X_val W - Y_val||^2."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, out, generator=g, dtype=dtype)
    Xv, Yv = torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, out, generator=g, dtype=dtype)

    def lower(x, y, batch):
        w = y["w"]
        return 0.5 * ((X @ w - Y) ** 2).sum() / n + 0.5 * (x["log_penalty"].exp()[:, None] * w ** 2).sum()

    def upper(x, y, batch):
        return 0.5 * ((Xv @ y["w"] - Yv) ** 2).sum() / n

    x0 = {"log_penalty": torch.full((d,), -1.0, dtype=dtype)}
    y0 = {"w": 0.1 * torch.randn(d, out, generator=g, dtype=dtype)}
    return FunctionProblem(upper, lower, x0, y0, name="linear"), x0, y0


def mlp_problem(dtype, n=256, d=64, width=32, classes=10):
    """An MLP d-width-classes (tanh) on inputs scaled by exp(x), cross-entropy + 1/2 ||y||^2 (strongly convex lower level here)."""
    g = torch.Generator().manual_seed(1)
    X, labels = torch.randn(n, d, generator=g, dtype=dtype), torch.randint(classes, (n,), generator=g)
    Xv, lv = torch.randn(n, d, generator=g, dtype=dtype), torch.randint(classes, (n,), generator=g)

    def logits(x, y, inputs):
        h = torch.tanh((inputs * x["log_scale"].exp()) @ y["w1"] + y["b1"])
        return h @ y["w2"] + y["b2"]

    def lower(x, y, batch):
        return F.cross_entropy(logits(x, y, X), labels) + 0.5 * sum((p ** 2).sum() for p in y.values())

    def upper(x, y, batch):
        return F.cross_entropy(logits(x, y, Xv), lv)

    x0 = {"log_scale": torch.zeros(d, dtype=dtype)}
    y0 = {"w1": 0.3 * torch.randn(d, width, generator=g, dtype=dtype), "b1": torch.zeros(width, dtype=dtype),
          "w2": 0.3 * torch.randn(width, classes, generator=g, dtype=dtype), "b2": torch.zeros(classes, dtype=dtype)}
    return FunctionProblem(upper, lower, x0, y0, name="mlp"), x0, y0


# ---------------------------------------------------------------------------------------------
# The hand-written baseline.

def _dot(a, b):
    return torch.stack([(u * w).sum() for u, w in zip(a, b)]).sum()


def baseline(problem, x, y, method, steps):
    xs = [t.detach().requires_grad_(True) for t in x.values()]
    ys = [t.detach().requires_grad_(True) for t in y.values()]
    xd, yd = dict(zip(x, xs)), dict(zip(y, ys))
    grads = torch.autograd.grad(problem.upper_loss(xd, yd, None), xs + ys, allow_unused=True, materialize_grads=True)
    gx, b = grads[:len(xs)], grads[len(xs):]
    xl = [t.detach().requires_grad_(True) for t in x.values()]
    yl = [t.detach().requires_grad_(True) for t in y.values()]
    gy = torch.autograd.grad(problem.lower_loss(dict(zip(x, xl)), dict(zip(y, yl)), None), yl, create_graph=True)

    def hvp(u):
        return torch.autograd.grad(gy, yl, u, retain_graph=True)

    if method == "cg":
        v = [torch.zeros_like(t) for t in b]
        r, p = [t.clone() for t in b], [t.clone() for t in b]
        rr = _dot(r, r)
        threshold = (torch.finfo(rr.dtype).eps * rr.sqrt()) ** 2
        for _ in range(steps):
            if rr <= threshold:
                break
            ap = hvp(p)
            alpha = rr / _dot(p, ap)
            v = [vi + alpha * pi for vi, pi in zip(v, p)]
            r = [ri + -alpha * ai for ri, ai in zip(r, ap)]
            rr_new = _dot(r, r)
            p = [ri + (rr_new / rr) * pi for ri, pi in zip(r, p)]
            rr = rr_new
    else:
        u = [t.clone() for t in b]
        total = u
        for _ in range(steps):
            u = [ui + -NEUMANN_LR * hi for ui, hi in zip(u, hvp(u))]
            total = [ti + ui for ti, ui in zip(total, u)]
        v = [t * NEUMANN_LR for t in total]
    cross = torch.autograd.grad(gy, xl, v)
    return {k: g - c for k, g, c in zip(x, gx, cross)}


def library(problem, x, y, method, steps, hvp_mode, masked_cg):
    if method == "cg" and masked_cg:
        solve = lambda mv, b: linear_system.conjugate_gradient(mv, b, steps=steps, host_sync=False)  # noqa: E731
        return hypergrad.implicit(problem, x, y, None, None, None, solve, hvp_mode)[0]
    options = {"lr": NEUMANN_LR} if method == "neumann" else {}
    return bilevel.hypergradient(problem, x, y, None, None, method=method, steps=steps, hvp_mode=hvp_mode,
                                 **options)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--hvp-mode", choices=("reverse", "forward"), default="reverse")
    parser.add_argument("--masked-cg", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, median of {args.repeats} interleaved repeats, "
          f"library hvp_mode={args.hvp_mode}{', masked CG' if args.masked_cg else ''}")
    print(f"{'lower':<8s}{'dtype':<9s}{'method':<9s}{'K':>4s}{'torch ms':>10s}{'bilevel ms':>12s}"
          f"{'ratio':>8s}{'max dev':>11s}")
    ratios = []
    for make in (linear_problem, mlp_problem):
        for dtype in (torch.float64, torch.float32):
            problem, x, y = make(dtype)
            for method in ("cg", "neumann"):
                for steps in (5, 10, 20):
                    def base():
                        return baseline(problem, x, y, method, steps)

                    def lib():
                        return library(problem, x, y, method, steps, args.hvp_mode, args.masked_cg)
                    for _ in range(2):
                        base(), lib()
                    tb, tl = [], []
                    for i in range(args.repeats):
                        order = (base, lib) if i % 2 == 0 else (lib, base)
                        for fn in order:
                            t, out = timed(fn)
                            (tb if fn is base else tl).append(t)
                            if fn is base:
                                ref = out
                            else:
                                got = out
                    mb, ml = statistics.median(tb), statistics.median(tl)
                    ratio = statistics.median(a / b for a, b in zip(tl, tb))  # paired: robust to load drift
                    dev = max(float((got[k] - ref[k]).abs().max()) for k in ref)
                    ratios.append(ratio)
                    print(f"{problem.name:<8s}{str(dtype)[6:]:<9s}{method:<9s}{steps:>4d}{1000 * mb:>10.3f}"
                          f"{1000 * ml:>12.3f}{ratio:>8.3f}{dev:>11.2e}")
    print(f"median ratio {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()

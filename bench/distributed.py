"""Data-parallel scaling: steps per second of one run with 1 and 2 (or more) processes.

    python bench/distributed.py [--problem hyperclean-digits] [--solver soba] [--steps 100]
                                [--batch-size 512] [--processes 1 2] [--device cpu]
                                [--option n_train=1000 ...]

Each world size runs the same job (same seed, same global batches: the iterates are the
single-process ones, bilevel.distributed) in processes started by torch.multiprocessing with
gloo on the CPU (NCCL with --device cuda, one GPU per process). Steps per second are those of
rank 0's solver time (evaluation excluded), and the ratio to one process is printed. Every
process uses one intra-op thread, so N processes use N cores: on a machine whose cores are
busy the ratio says little. No multi-GPU machine was available when this was written: only
the CPU / gloo numbers in bench/README.md were measured.
"""
import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bilevel
from bilevel import make_problem


def _parse(item):
    key, _, text = item.partition("=")
    for kind in (int, float):
        try:
            return key, kind(text)
        except ValueError:
            pass
    return key, text


def _worker(rank, world, rendezvous, args, out):
    torch.set_num_threads(1)
    if world > 1:
        backend = "nccl" if args.device == "cuda" else "gloo"
        if args.device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    device = f"cuda:{rank}" if args.device == "cuda" else "cpu"
    try:
        options = dict(_parse(item) for item in args.option)
        sizes = ({"batch_size": args.batch_size} if args.problem == "quadratic" else
                 {"batch_size": args.batch_size, "val_batch_size": args.batch_size})
        problem = make_problem(args.problem, device=device, **sizes, **options)
        bilevel.solve(problem, args.solver, args.warmup, seed=0, eval_every=max(1, args.warmup))  # warm caches
        result = bilevel.solve(problem, args.solver, args.steps, seed=0, eval_every=args.steps)
        if rank == 0:
            torch.save({"steps_per_s": args.steps / result.wall_time, "final": result.final}, out)
    finally:
        if world > 1:
            dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="hyperclean-digits")
    parser.add_argument("--solver", default="soba")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a problem option (int, float or string), repeatable")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    if args.device == "cuda" and max(args.processes) > torch.cuda.device_count():
        parser.error(f"--processes {max(args.processes)} needs as many GPUs; this machine has "
                     f"{torch.cuda.device_count()}")
    print(f"{args.problem}, {args.solver}, global batch {args.batch_size}, {args.steps} steps, {args.device} "
          f"({'nccl' if args.device == 'cuda' else 'gloo'})")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.processes:
            out = os.path.join(tmp, f"world{world}.pt")
            mp.spawn(_worker, args=(world, os.path.join(tmp, f"rdv{world}"), args, out), nprocs=world, join=True)
            measured = torch.load(out, weights_only=False)
            rate = measured["steps_per_s"]
            base = base or rate
            metric = {k: v for k, v in measured["final"].items() if not k.startswith(("calls", "time", "iter"))}
            first = next(iter(metric.items()), ("", float("nan")))
            print(f"  {world} process(es): {rate:8.2f} steps/s   x{rate / base:.2f} of 1 process   "
                  f"final {first[0]} {first[1]:.6g}")


if __name__ == "__main__":
    main()

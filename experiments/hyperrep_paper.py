"""Hyper-representation (meta-learning) with the protocol of SLIP and BO-REP: methods x (lower,
upper) step grid x seeds, the best grid point per method on validation, its test accuracy as
mean +- std, and the curves against epochs and wall time.

Gong, Hao, Liu. A Nearly Optimal Single Loop Algorithm for Stochastic Bilevel Optimization under
Unbounded Smoothness. ICML 2024 (SNLI meta-tasks, 20 epochs; official commands in
MingruiLiu-ML-Lab/Single-Loop-bilevel-Optimizer-under-Unbounded-Smoothness, hyper-representation/
README.md). Hao, Gong, Liu. Bilevel Optimization under Unbounded Smoothness. ICLR 2024 (Amazon
reviews, the grid {0.001, 0.005, 0.01, 0.05, 0.1, 0.5} for both step sizes, seeds 0-4).

Problem (problems/hyperrep.py, preset ``paper``): x = a 2-layer Elman RNN encoder, y = one head
shared by all tasks; g = support CE + 1e-4 ||y||^2, f = query CE; 500 train tasks of 2 classes x
(10 support + 10 query) samples, 20 tasks per outer iteration (so an epoch is 25 outer
iterations); test accuracy after a one-step adaptation of a copy of the head on each of 100
held-out test tasks. Selection metric: ``train_query_loss`` (the upper objective f on a fixed set
of 64 train tasks: the query sets are the bilevel validation data; the test tasks are never used
for the choice).

Data: ``--dataset rotten-tomatoes`` (default, offline stand-in; 2 classes), or the user's files:
``--dataset snli --data-path DIR`` (SLIP; InferSent directory), ``--dataset amazon --data-path
dataset.json`` (BO-REP; test tasks from held-out domains), ``--dataset table --data-path trec.csv
--label-column coarse_label`` (AdamBO's TREC).

Methods: SLIP's baselines available here (StocBiO, TTSA, F2SA, SABA, MA-SOBA, BO-REP, SLIP) and the
lower-only baseline (the encoder stays at its initialisation). MAML and ANIL are not in this
library. Fixed options from SLIP's commands where they map (StocBiO 5 inner steps, Neumann step
0.1; SABA / MA-SOBA z step 0.05 / 0.01; BO-REP warm start 3, period 2; SLIP period 1); every
Neumann series has 3 terms.

    python experiments/hyperrep_paper.py [--epochs 20] [--seeds 0 1 2 3 4] [--lower ...] [--upper ...]
        [--train-tasks 500 --test-tasks 100 --tasks-per-batch 20 --shots 10 --enc-dim 256]
        [--dataset snli --data-path DIR] [--methods ...] [--out DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bilevel  # noqa: E402
from protocol import Experiment, Method, epochs_per_batch, run  # noqa: E402

NEUMANN = {"neumann_steps": 3, "neumann_lr": 0.1}
METHODS = {
    "lower-only": Method("lower-only", lower_only=True),
    "stocbio": Method("stocbio", {"inner_steps": 5, **NEUMANN}, sgd_upper=True),
    "ttsa": Method("ttsa", NEUMANN, sgd_upper=True),
    "f2sa": Method("f2sa", {"inner_steps": 5}, sgd_upper=True),
    "saba": Method("saba", {"z_lr": 0.05}, sgd_upper=True),
    "ma-soba": Method("ma-soba", {"z_lr": 0.01, "beta": 0.9}, sgd_upper=True),
    "bo-rep": Method("bo-rep", {"period": 2, "warm_steps": 3, **NEUMANN}),
    "slip": Method("slip", {"warm_steps": 3, **NEUMANN}),
}


def add_arguments(parser):
    parser.add_argument("--dataset", default="rotten-tomatoes", choices=["rotten-tomatoes", "snli", "amazon", "table"])
    parser.add_argument("--data-path", default=None, help="the user's file (offline copy for rotten-tomatoes)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--glove-path", default=None)
    parser.add_argument("--train-tasks", type=int, default=500)
    parser.add_argument("--test-tasks", type=int, default=100)
    parser.add_argument("--tasks-per-batch", type=int, default=20)
    parser.add_argument("--shots", type=int, default=10, help="support and query samples per class")
    parser.add_argument("--enc-dim", type=int, default=256)
    parser.add_argument("--embed-dim", type=int, default=300)
    parser.add_argument("--head-hidden", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=48)
    parser.add_argument("--max-vocab", type=int, default=20000)


def build(args):
    return bilevel.make_problem(
        "hyperrep", "paper", device=args.device, dataset=args.dataset, data_path=args.data_path,
        text_column=args.text_column, label_column=args.label_column, glove_path=args.glove_path,
        n_train_tasks=args.train_tasks, n_test_tasks=args.test_tasks, tasks_per_batch=args.tasks_per_batch,
        k_support=args.shots, k_query=args.shots, enc_dim=args.enc_dim, embed_dim=args.embed_dim,
        head_hidden=args.head_hidden, max_len=args.max_len, max_vocab=args.max_vocab)


EXPERIMENT = Experiment(
    title="hyper-representation", description=__doc__, methods=METHODS, build=build,
    epochs_per_step=lambda p: epochs_per_batch(p.tasks_per_batch, p.n_train_tasks), add_arguments=add_arguments,
    metrics=("test_accuracy_unadapted",), epochs=20.0, out="results/hyperrep_paper")


def main(argv=None):
    return run(EXPERIMENT, argv)


if __name__ == "__main__":
    main()

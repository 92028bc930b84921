"""Hyperparameter optimization of a recurrent classifier (BO-REP's third experiment) with the
paper's protocol: methods x (lower, upper) step grid x seeds, the best grid point per method on
validation loss, its test accuracy as mean +- std, curves against epochs and wall time.

Hao, Gong, Liu. Bilevel Optimization under Unbounded Smoothness: A New Algorithm and Convergence
Analysis. ICLR 2024: grid {0.001, 0.005, 0.01, 0.05, 0.1, 0.5} for both step sizes, seeds 0-4,
baselines StocBiO, TTSA, SOBA, SABA, MA-SOBA (MAML / ANIL only in hyper-representation); the
official code's hyperparam_opt folder (MingruiLiu-ML-Lab/Bilevel-Optimization-under-Unbounded-
Smoothness; 25 epochs, batch 50 reviews per task).

Problem (problems/hpo_recurrent.py, preset ``paper``): x = log of one L2 weight, y = a 1-layer
256-unit Elman RNN classifier (fc 128); g = train CE + exp(x)/2 ||y||^2, f = validation CE; x0 =
-6. Selection metric: ``val_loss`` (CE on the whole validation split, min); reported:
``test_accuracy`` and the learned ``log_reg``. The hypergradient in x carries the factor
exp(x) ~ 2.5e-3, so the plain-SGD upper updates get the upper grid times ``--sgd-upper-scale``
(default 1000 ~ 1 / exp(x0); at 100, log_reg moved by less than 0.2 in 3 epochs at every grid
point); BO-REP's normalized step is a length in log_reg and takes the grid as it is.

Data: ``--dataset rotten-tomatoes`` (default, offline stand-in), or the user's files:
``--dataset amazon --data-path dataset.json`` (BO-REP's reviews), ``--dataset sent140 --data-path
FILE.json`` or ``--dataset table --data-path FILE`` (csv / json / parquet).

Fixed options: StocBiO 3 inner steps; every Neumann series 3 terms at step 0.1 (at the weak
penalty the RNN's lower problem is not convex, and 10 steps end in NaN: problems/hpo_recurrent.py);
SOBA / SABA / MA-SOBA z step 0.1; BO-REP period 2, 3 inner steps, 3 warm steps.

    python experiments/hpo_rnn_paper.py [--epochs 25] [--seeds 0 1 2 3 4] [--lower ...] [--upper ...]
        [--n-train 5000 --n-val 2500 --n-test 2500 --hidden 256] [--dataset amazon --data-path FILE]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bilevel  # noqa: E402
from protocol import Experiment, Method, epochs_per_batch, run  # noqa: E402

NEUMANN = {"neumann_steps": 3, "neumann_lr": 0.1}
METHODS = {
    "lower-only": Method("lower-only", lower_only=True),
    "stocbio": Method("stocbio", {"inner_steps": 3, **NEUMANN}, sgd_upper=True),
    "ttsa": Method("ttsa", NEUMANN, sgd_upper=True),
    "soba": Method("soba", {"z_lr": 0.1}, sgd_upper=True),
    "saba": Method("saba", {"z_lr": 0.1}, sgd_upper=True),
    "ma-soba": Method("ma-soba", {"z_lr": 0.1, "beta": 0.9}, sgd_upper=True),
    "bo-rep": Method("bo-rep", {"period": 2, "inner_steps": 3, "warm_steps": 3, **NEUMANN}),
}


def add_arguments(parser):
    parser.add_argument("--dataset", default="rotten-tomatoes",
                        choices=["rotten-tomatoes", "amazon", "sent140", "table"])
    parser.add_argument("--data-path", default=None, help="the user's file (offline copy for rotten-tomatoes)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--glove-path", default=None)
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-val", type=int, default=2500)
    parser.add_argument("--n-test", type=int, default=2500)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--embed-dim", type=int, default=100)
    parser.add_argument("--fc", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=48)
    parser.add_argument("--max-vocab", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=50)


def build(args):
    return bilevel.make_problem(
        "hpo-rnn", "paper", device=args.device, dataset=args.dataset, data_path=args.data_path,
        text_column=args.text_column, label_column=args.label_column, glove_path=args.glove_path,
        n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, hidden=args.hidden, embed_dim=args.embed_dim,
        fc=args.fc, max_len=args.max_len, max_vocab=args.max_vocab, batch_size=args.batch_size,
        val_batch_size=args.batch_size)


EXPERIMENT = Experiment(
    title="recurrent hyperparameter optimization", description=__doc__, methods=METHODS, build=build,
    epochs_per_step=lambda p: epochs_per_batch(p.batch_size, p.n_train), add_arguments=add_arguments,
    metrics=("log_reg",), epochs=25.0, sgd_upper_scale=1000.0, out="results/hpo_rnn_paper")


def main(argv=None):
    return run(EXPERIMENT, argv)


if __name__ == "__main__":
    main()

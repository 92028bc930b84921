"""Deep AUC maximization with AccBO's experiment and the BO-REP grid protocol: methods x (lower,
upper) step grid x seeds, the best grid point per method on validation AUC, its test AUC as
mean +- std, and the paper's figure: train and test AUC against epochs and against running time.

Gong, Hao, Liu. An Accelerated Algorithm for Stochastic Bilevel Optimization under Unbounded
Smoothness. NeurIPS 2024. Deep AUC maximization on imbalanced Sentiment140 (positive ratio 0.8,
2500 train / 2500 validation tweets, batch 32, 25 epochs; official code
MingruiLiu-ML-Lab/Accelerated-Bilevel-Optimization-Unbounded-Smoothness, auc_maximization/
main.py); its figure draws (a) train AUC and (b) test AUC against epochs, (c)-(d) the same
against running time, for AccBO, StocBiO, TTSA, SABA, MA-SOBA, SUSTAIN, VRBO and BO-REP. The
official code fixes one step pair per method (seed 2); the grid {0.001, 0.005, 0.01, 0.05, 0.1,
0.5} for both step sizes and seeds 0-4 are BO-REP's protocol (Hao, Gong, Liu, ICLR 2024).

Problem (problems/auc.py, preset ``paper``): x = a 1-layer 256-unit Elman RNN classifier (fc 128)
and the AUC-M scalars (a, b), y = the dual alpha; f = AUC-M loss on validation, g = -AUC-M loss
on train (strongly concave in alpha). Selection metric: ``val_auc`` (ROC AUC on the validation
split, max); reported: ``test_auc`` (global ROC AUC on a natural-ratio test split of the same
corpus) and ``train_auc``.

Data: ``--dataset rotten-tomatoes`` (default, offline stand-in), or the user's files:
``--dataset sent140 --data-path FILE.json`` (LEAF json) or ``--dataset table --data-path FILE``
(csv / json / parquet with 0 / 1 labels).

Fixed options from AccBO's ``main.py`` where they map: StocBiO 3 inner steps, Neumann step 0.01;
TTSA Neumann step 0.1; SABA z step 0.01; MA-SOBA z step 0.1, beta 0.9; BO-REP Neumann step 0.01,
3 inner steps, period 2; SUSTAIN Neumann step 0.01; VRBO Neumann step 0.01, period 2, 2 inner
steps; AccBO Neumann step 0.1, 3 warm steps, momentum 0.5, beta 0.9, averaging 0.5, 1 inner
step. Every Neumann series has 3 terms (AccBO's Q = 3).

    python experiments/auc_paper.py [--epochs 25] [--seeds 0 1 2 3 4] [--lower ...] [--upper ...]
        [--n-train 2500 --n-val 2500 --n-test 2000 --hidden 256] [--dataset sent140 --data-path FILE]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bilevel  # noqa: E402
from protocol import Experiment, Method, epochs_per_batch, run  # noqa: E402

Q = {"neumann_steps": 3}
METHODS = {
    "lower-only": Method("lower-only", lower_only=True),
    "accbo": Method("accbo", {"neumann_lr": 0.1, "warm_steps": 3, "momentum": 0.5, "beta": 0.9, "averaging": 0.5,
                              "inner_steps": 1, **Q}),
    "stocbio": Method("stocbio", {"inner_steps": 3, "neumann_lr": 0.01, **Q}, sgd_upper=True),
    "ttsa": Method("ttsa", {"neumann_lr": 0.1, **Q}, sgd_upper=True),
    "saba": Method("saba", {"z_lr": 0.01}, sgd_upper=True),
    "ma-soba": Method("ma-soba", {"z_lr": 0.1, "beta": 0.9}, sgd_upper=True),
    "sustain": Method("sustain", {"neumann_lr": 0.01, **Q}, sgd_upper=True),
    "vrbo": Method("vrbo", {"neumann_lr": 0.01, "period": 2, "inner_steps": 2, **Q}, sgd_upper=True),
    "bo-rep": Method("bo-rep", {"neumann_lr": 0.01, "inner_steps": 3, "period": 2, **Q}),
}


def add_arguments(parser):
    parser.add_argument("--dataset", default="rotten-tomatoes", choices=["rotten-tomatoes", "sent140", "table"])
    parser.add_argument("--data-path", default=None, help="the user's file (offline copy for rotten-tomatoes)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--glove-path", default=None)
    parser.add_argument("--n-train", type=int, default=2500)
    parser.add_argument("--n-val", type=int, default=2500)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--positive-ratio", type=float, default=0.8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--embed-dim", type=int, default=100)
    parser.add_argument("--fc", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=48)
    parser.add_argument("--max-vocab", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=32)


def build(args):
    return bilevel.make_problem(
        "auc", "paper", device=args.device, dataset=args.dataset, data_path=args.data_path,
        text_column=args.text_column, label_column=args.label_column, glove_path=args.glove_path,
        n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, positive_ratio=args.positive_ratio,
        hidden=args.hidden, embed_dim=args.embed_dim, fc=args.fc, max_len=args.max_len, max_vocab=args.max_vocab,
        batch_size=args.batch_size, val_batch_size=args.batch_size)


EXPERIMENT = Experiment(
    title="deep AUC maximization", description=__doc__, methods=METHODS, build=build,
    epochs_per_step=lambda p: epochs_per_batch(p.batch_size, p.n_train), add_arguments=add_arguments,
    metrics=("train_auc",), epochs=25.0, out="results/auc_paper")


def main(argv=None):
    return run(EXPERIMENT, argv)


if __name__ == "__main__":
    main()

"""Data hyper-cleaning with the BO-REP paper's protocol: a step-size grid, several seeds, the
best grid point per method chosen on validation, then its test metrics as mean +- std.

Hao, Gong, Liu. Bilevel Optimization under Unbounded Smoothness: A New Algorithm and Convergence
Analysis. ICLR 2024. Section 5: "We use grid search to tune the lower-level and upper-level step
sizes from {0.001, 0.005, 0.01, 0.05, 0.1, 0.5} for all methods"; the official data-cleaning
script runs seeds 0-4 with noise rate 0.1 (MingruiLiu-ML-Lab/Bilevel-Optimization-under-
Unbounded-Smoothness, data_cleaning/run.sh).

Here, at a CPU-feasible size, on the offline stand-in: digits hyper-cleaning (scikit-learn's
digits, 1000 training samples with noise_rate 0.1 of flipped labels, 300 clean validation and
497 test samples, batches of 128; a linear classifier instead of the paper's RNN on
Sentiment140). The protocol (grid x seeds batched, selection on the problem's validation
metric, the "edge" column, figures against epochs and wall time) is experiments/protocol.py.
The paper's grid is used for BO-REP's normalized upper step (a step length); for the plain-SGD
upper updates (SOBA, StocBiO) the upper grid is multiplied by ``--sgd-upper-scale`` (default
1000 = n_train: the hypergradient entries of per-sample weights scale as 1 / n_train, so the
paper's values would leave x where it starts). The lower grid starts at 0.05 (0.001 to 0.01 barely
move y here) and, like the upper grid, reaches past the paper's 0.5, where the first run chose
its points (on the edge).

    python experiments/hyperclean_paper.py [--epochs 38.4 | --steps 300] [--seeds 0 1 2 3 4]
        [--lower 0.05 0.1 0.5 1 2] [--upper 0.01 0.05 0.1 0.5 1 2] [--out DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bilevel  # noqa: E402
from protocol import Experiment, Method, epochs_per_batch, run  # noqa: E402

METHODS = {
    "lower-only": Method("lower-only", lower_only=True),
    "soba": Method("soba", {"z_lr": 0.5}, sgd_upper=True),
    "stocbio": Method("stocbio", {"neumann_lr": 0.5, "neumann_steps": 5, "inner_steps": 5}, sgd_upper=True),
    "bo-rep": Method("bo-rep", {"neumann_lr": 0.5}),
}


def build(args):
    return bilevel.make_problem("hyperclean-digits", noise_rate=args.noise_rate, device=args.device)


def add_arguments(parser):
    parser.add_argument("--noise-rate", type=float, default=0.1)


EXPERIMENT = Experiment(
    title="digits hyper-cleaning", description=__doc__, methods=METHODS, build=build,
    epochs_per_step=lambda p: epochs_per_batch(p.batch_size, p.n_train), add_arguments=add_arguments,
    metrics=("f1",), epochs=38.4, lower=(0.05, 0.1, 0.5, 1.0, 2.0), upper=(0.01, 0.05, 0.1, 0.5, 1.0, 2.0),
    sgd_upper_scale=1000.0, out="results/hyperclean_paper")


def main(argv=None):
    return run(EXPERIMENT, argv)


if __name__ == "__main__":
    main()

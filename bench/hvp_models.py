"""Cost of the second-order oracles on the shared text models, relative to one gradient.

    python bench/hvp_models.py [--repeats 3] [--stat median|min] [--batch 64] [--seq 40] [--hidden 128] [--threads N]

Each model is a ``Classifier`` from ``bilevel.problems.models`` (float32, vocabulary 5000,
embeddings 64): an Elman RNN, an LSTM and a GRU encoder with ``hidden`` units, and the
transformer encoder (dim 64, 4 heads, 2 layers, feed-forward ``hidden``). The lower loss is the
hyper-cleaning one on a single padded token batch,

    g(x, y) = mean_i sigmoid(x_i) CE(net_y(tokens_i), labels_i) + mu/2 ||y||^2,

and the script times, through ``bilevel.oracles``: grad_y g, d2_yy g . v reverse-over-reverse,
d2_yy g . v forward-over-reverse (``mode="forward"``; the last column says whether the oracle
fell back, e.g. to "no_onednn" for the oneDNN LSTM kernel, which has no forward-mode rule) and
d2_xy g . v (reverse). Every time is a median over rounds that run the four products in turn,
printed as a ratio to the gradient's median time with oneDNN enabled, measured in the same
process; each model is timed twice, with the default kernels and inside
``torch.backends.mkldnn.flags(enabled=False)``. Ratios, not seconds, carry over between
machines; on a loaded machine run it twice and compare.
"""
import argparse
import statistics
import time
import warnings

import torch

from bilevel import oracles, tree
from bilevel.problem import FunctionProblem
from bilevel.problems.models import (
    Classifier, FunctionalModel, MLP, RecurrentEncoder, TransformerEncoder, cross_entropy, squared_norm,
)

# torch.backends.mkldnn.flags() warns about TF32 on Intel GPUs at every call; irrelevant on CPU.
warnings.filterwarnings("ignore", message="TF32 acceleration")
STATS = {"median": statistics.median, "min": min}

VOCAB, EMBED, HEADS, LAYERS, MU = 5000, 64, 4, 2, 1e-3


def encoders(hidden, seq):
    return {
        "RNN": lambda: RecurrentEncoder(VOCAB, EMBED, hidden, cell="rnn"),
        "LSTM": lambda: RecurrentEncoder(VOCAB, EMBED, hidden, cell="lstm"),
        "GRU": lambda: RecurrentEncoder(VOCAB, EMBED, hidden, cell="gru"),
        "Transformer": lambda: TransformerEncoder(VOCAB, dim=EMBED, heads=HEADS, layers=LAYERS, ff=hidden,
                                                  max_len=seq),
    }


def token_batch(batch, seq, generator):
    """Random ids in 2..VOCAB-1, right-padded to random lengths in seq/4..seq; binary labels."""
    tokens = torch.randint(2, VOCAB, (batch, seq), generator=generator)
    lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=generator)
    tokens[torch.arange(seq)[None, :] >= lengths[:, None]] = 0
    return tokens, torch.randint(2, (batch,), generator=generator)


def text_problem(encoder, tokens, labels, name):
    model = FunctionalModel(Classifier(encoder, MLP(encoder.out_dim, [], 2)), torch.float32)

    def lower(x, y, batch):
        return cross_entropy(model(y, tokens), labels, torch.sigmoid(x["w"])) + 0.5 * MU * squared_norm(y)

    y0 = model.init(torch.Generator().manual_seed(0))
    return FunctionProblem(lower, lower, {"w": torch.zeros(len(labels))}, y0, name=name)


def fallback_of(problem):
    """What the forward oracle fell back to for this problem (None: forward mode worked)."""
    return oracles._remembered_fallback(problem)  # private, read-only: the oracle has no public query


def interleaved_times(fns, repeats, stat):
    """``stat`` (median or min) of each function's seconds, timed in ``repeats`` rounds that run
    every function once (after one warm-up round), so that a change of load hits all alike."""
    times = [[] for _ in fns]
    for round_ in range(repeats + 1):
        for fn, record in zip(fns, times):
            start = time.perf_counter()
            fn()
            if round_:
                record.append(time.perf_counter() - start)
    return [STATS[stat](t) for t in times]


def time_products(build, tokens, labels, name, repeats, stat):
    """Median seconds of grad, hvp reverse, hvp forward, cross; the forward fallback; dim y."""
    problem = text_problem(build(), tokens, labels, name)
    x, y = problem.init(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    v = {k: torch.randn(t.shape, generator=g) for k, t in y.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = interleaved_times([
            lambda: oracles.grad_lower_y(problem, x, y, None),
            lambda: oracles.hvp(problem, x, y, v, None, mode="reverse"),
            lambda: oracles.hvp(problem, x, y, v, None, mode="forward"),
            lambda: oracles.cross(problem, x, y, v, None, mode="reverse")], repeats, stat)
    return times, fallback_of(problem), tree.numel(y)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--stat", choices=sorted(STATS), default="median",
                        help="statistic over the rounds; min is steadier on a loaded machine")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tokens, labels = token_batch(args.batch, args.seq, torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, seq {args.seq}, "
          f"vocab {VOCAB}, embed {EMBED}, hidden {args.hidden}; float32; {args.stat} of {args.repeats} rounds")
    print("ratios to one grad_y g with oneDNN on (same model, same process)")
    print(f"{'model':<12s}{'oneDNN':>7s}{'params':>9s}{'grad ms':>9s}{'grad':>7s}{'hvp rev':>9s}"
          f"{'hvp fwd':>9s}{'cross':>7s}  forward fallback")
    for name, build in encoders(args.hidden, args.seq).items():
        base = None
        for onednn in (True, False):
            with torch.backends.mkldnn.flags(enabled=onednn):
                times, fallback, size = time_products(build, tokens, labels, name, args.repeats, args.stat)
            base = base or times[0]
            ratios = "".join(f"{t / base:>{w}.2f}" for t, w in zip(times, (7, 9, 9, 7)))
            print(f"{name:<12s}{'on' if onednn else 'off':>7s}{size:>9d}{1000 * times[0]:>9.1f}{ratios}  "
                  f"{fallback or 'none'}")


if __name__ == "__main__":
    main()

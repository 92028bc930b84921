"""Shared by the problems built on a recurrent text classifier (deep AUC maximization, recurrent HPO).

A problem here holds three token splits (train, validation, test) of one text corpus and a
:class:`~bilevel.problems.models.FunctionalModel` classifier

    logits(w; tokens) = head(encoder(tokens)),     encoder = RecurrentEncoder (RNN / LSTM / GRU),
    head = Linear(hidden, fc) -> tanh -> Linear(fc, fc) -> tanh -> Linear(fc, n_outputs)

(the official ``RNN`` of BO-REP / AccBO, ``RNN_net.py`` in their repositories; ``fc = 0`` gives a linear
head). The vocabulary is fitted on the training split only (:func:`corpora.encode_text`), so
validation and test words never enter it.

Batches follow the finite-sum protocol of :mod:`bilevel.memory`: a 1-d LongTensor of indices
into the training split (lower level) or the validation split (upper level) of ``batch_size`` /
``val_batch_size`` samples (None: the whole split), epoch-shuffled fixed blocks by default, i.i.d.
uniform with sampling="replacement" (:mod:`problems.batches`); ``n_samples`` gives
the split sizes. Token rows are cut to the longest sequence of the batch (padding is at the end
and never reaches a feature, see :class:`~bilevel.problems.models.RecurrentEncoder`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from bilevel.problem import BilevelProblem

from .batches import IndexBatches, in_chunks, select, trim_padding
from .corpora import Corpus, encode_text, load_corpus, subset
from .models import CELLS, MLP, Classifier, FunctionalModel, RecurrentEncoder
from .options import check_choice, check_int, check_precision


# -- data --------------------------------------------------------------------------------------

def load_text(problem: str, dataset: str, allowed: Sequence[str], data_path: Optional[str],
              text_column: str, label_column: str) -> Corpus:
    """The corpus ``dataset`` (one of ``allowed``), checked to hold single texts."""
    check_choice(problem, "dataset", dataset, allowed)
    corpus = load_corpus(dataset, data_path=data_path, text_column=text_column, label_column=label_column)
    if corpus.kind != "text":
        raise ValueError(f"{problem}: dataset {dataset!r} holds {corpus.kind}, not single texts")
    return corpus


@dataclass
class TextSplits:
    """Token ids (N, L) and int64 labels (N,) of the three splits, with the train-only vocabulary
    and the GloVe rows (None without ``glove_path``)."""

    train_tokens: Tensor
    train_labels: Tensor
    val_tokens: Tensor
    val_labels: Tensor
    test_tokens: Tensor
    test_labels: Tensor
    vocab: object
    embeddings: Optional[Tensor]


def encode_splits(corpus: Corpus, splits: Tuple[np.ndarray, np.ndarray, np.ndarray], max_len: int,
                  min_freq: int, max_vocab: Optional[int], glove_path: Optional[str], seed: int) -> TextSplits:
    """Tokenize the samples of ``splits = (train, val, test)`` (index arrays into ``corpus``) with a
    vocabulary fitted on ``train`` alone."""
    train, val, test = (np.asarray(s, dtype=np.int64) for s in splits)
    used = np.concatenate([train, val, test])
    encoded = encode_text(subset(corpus, used), np.arange(len(train)), max_len=max_len, min_freq=min_freq,
                          max_vocab=max_vocab, glove_path=glove_path, seed=seed)
    labels = torch.as_tensor(corpus.labels[used])
    ends = np.cumsum([len(train), len(val), len(test)])
    parts = [slice(0, ends[0]), slice(ends[0], ends[1]), slice(ends[1], ends[2])]
    tokens = [encoded.tokens[p] for p in parts]
    return TextSplits(tokens[0], labels[parts[0]], tokens[1], labels[parts[1]], tokens[2], labels[parts[2]],
                      encoded.vocab, encoded.embeddings)


def batch_tokens(tokens: Tensor, batch: Optional[Tensor]) -> Tensor:
    """The rows ``batch`` of ``tokens`` (all rows for None), cut after the last non-padding column."""
    return trim_padding(select(tokens, batch))


# -- the model ---------------------------------------------------------------------------------

def build_classifier(vocab_size: int, n_outputs: int, cell: str, layers: int, hidden: int, embed_dim: int,
                     fc: int, embeddings: Optional[Tensor], dtype: torch.dtype,
                     autocast: Optional[torch.dtype] = None) -> FunctionalModel:
    """RecurrentEncoder + MLP head (two tanh layers of width ``fc``; none when fc = 0).
    With GloVe ``embeddings`` the embedding width is theirs and ``embed_dim`` is not used."""
    if embeddings is not None:
        embed_dim = int(embeddings.shape[1])
    encoder = RecurrentEncoder(vocab_size, embed_dim, hidden, cell=cell, layers=layers, embeddings=embeddings)
    head = MLP(encoder.out_dim, [fc, fc] if fc else [], n_outputs)
    return FunctionalModel(Classifier(encoder, head), dtype, autocast)


def check_model_options(problem: str, cell, layers, hidden, embed_dim, fc, max_len, min_freq, max_vocab) -> None:
    check_choice(problem, "cell", cell, CELLS)
    check_choice(problem, "layers", layers, (1, 2))
    for option, value in (("hidden", hidden), ("embed_dim", embed_dim), ("max_len", max_len),
                          ("min_freq", min_freq)):
        check_int(problem, option, value)
    check_int(problem, "fc", fc, minimum=0)
    check_int(problem, "max_vocab", max_vocab, allow_none=True)


def check_common_options(problem: str, batch_size, val_batch_size, seed,
                         dtype) -> Tuple[torch.dtype, Optional[torch.dtype]]:
    """Checks the batch sizes, the seed and the dtype; returns (torch dtype, autocast dtype or
    None), see :func:`~problems.options.check_precision`."""
    check_int(problem, "batch_size", batch_size, allow_none=True)
    check_int(problem, "val_batch_size", val_batch_size, allow_none=True)
    check_int(problem, "seed", seed, minimum=0)
    return check_precision(problem, dtype)


def predict(forward: Callable[[Tensor], Tensor], tokens: Tensor) -> Tensor:
    """``forward`` on all rows of ``tokens`` (padding trimmed per chunk), without gradients."""
    with torch.no_grad():
        return in_chunks(lambda part: forward(trim_padding(part)), tokens)


class TextClassifierProblem(IndexBatches, BilevelProblem):
    """Index-batch sampling and finite-sum sizes over the train (lower) and validation (upper)
    splits (:class:`~problems.batches.IndexBatches`). Subclasses set ``n_train``, ``n_val``,
    ``batch_size``, ``val_batch_size``."""

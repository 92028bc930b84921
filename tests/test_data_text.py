"""Tests of the text pipeline: tokenizer, vocabulary, padding, GloVe parsing and index splits."""
import gzip
import json
import random

import numpy as np
import pytest
import torch

from bilevel.problems.data.text import (PAD, PAD_INDEX, UNK, UNK_INDEX, Vocabulary, load_glove,
                                        pad_batch, tokenize)


# -- tokenize ----------------------------------------------------------------------------------

def test_tokenize_words_and_punctuation():
    assert tokenize("Don't panic -- it's 3.14!") == \
        ["don't", "panic", "-", "-", "it's", "3", ".", "14", "!"]
    assert tokenize("Hello, World!", lowercase=False) == ["Hello", ",", "World", "!"]
    assert tokenize("  tabs\tand\nnewlines  ") == ["tabs", "and", "newlines"]
    assert tokenize("café naïve") == ["café", "naïve"]
    assert tokenize("") == []


def test_tokenize_is_deterministic_and_rejects_non_strings():
    text = "A man, a plan, a canal: Panama!"
    assert tokenize(text) == tokenize(text) == ["a", "man", ",", "a", "plan", ",", "a", "canal", ":", "panama", "!"]
    with pytest.raises(TypeError):
        tokenize(["not", "a", "string"])


# -- Vocabulary --------------------------------------------------------------------------------

DOCS = [["b", "a", "c", "a"], ["b", "d", "e"], ["a", "c", "f"]]  # a:3, b:2, c:2, d/e/f:1


def test_vocabulary_order_specials_and_ties():
    v = Vocabulary(DOCS)
    assert v.itos == [PAD, UNK, "a", "b", "c", "d", "e", "f"]
    assert (v.index(PAD), v.index(UNK)) == (PAD_INDEX, UNK_INDEX) == (0, 1)
    assert len(v) == 8
    assert v.encode(["a", "zzz", "f"]) == [2, 1, 7]
    assert v.decode([2, 3]) == ["a", "b"]
    assert "a" in v and "zzz" not in v


def test_vocabulary_is_independent_of_input_order():
    rng = random.Random(0)
    shuffled = [list(doc) for doc in DOCS]
    for doc in shuffled:
        rng.shuffle(doc)
    rng.shuffle(shuffled)
    assert Vocabulary(shuffled).itos == Vocabulary(DOCS).itos


def test_vocabulary_min_freq_max_size_and_reserved():
    assert Vocabulary(DOCS, min_freq=2).itos == [PAD, UNK, "a", "b", "c"]
    assert Vocabulary(DOCS, max_size=2).itos == [PAD, UNK, "a", "b"]
    v = Vocabulary(DOCS + [["<s>", "<pad>", "<unk>"]], max_size=1, reserved=("<s>", "</s>"))
    assert v.itos == [PAD, UNK, "<s>", "</s>", "a"]  # specials in the data are not counted
    with pytest.raises(ValueError):
        Vocabulary(DOCS, min_freq=0)
    with pytest.raises(TypeError):
        Vocabulary(["a plain string instead of a token list"])


def test_vocabulary_round_trip_through_json():
    v = Vocabulary(DOCS, min_freq=1, max_size=4, reserved=("<s>",))
    w = Vocabulary.from_dict(json.loads(json.dumps(v.to_dict())))
    assert w == v and w.itos == v.itos and w.stoi == v.stoi
    assert (w.min_freq, w.max_size, w.reserved, w.counts) == (1, 4, ("<s>",), v.counts)
    assert w.encode(["a", "<s>", "nope"]) == v.encode(["a", "<s>", "nope"])
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary.from_dict({"itos": ["a", PAD, UNK]})
    with pytest.raises(KeyError, match="itos"):
        Vocabulary.from_dict({"words": []})


# -- pad_batch ---------------------------------------------------------------------------------

def test_pad_batch_pads_with_zero_and_reports_lengths():
    padded, lengths = pad_batch([[5, 6, 7], [8], []])
    assert padded.dtype == torch.long and lengths.dtype == torch.long
    assert padded.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert lengths.tolist() == [3, 1, 0]


def test_pad_batch_truncates_and_fixed_length():
    padded, lengths = pad_batch([[1, 2, 3, 4], np.array([5, 6]), torch.tensor([7])], max_len=3)
    assert padded.tolist() == [[1, 2, 3], [5, 6, 0], [7, 0, 0]]
    assert lengths.tolist() == [3, 2, 1]
    padded, lengths = pad_batch([[1, 2], [3]], max_len=5, fixed_length=True)
    assert padded.shape == (2, 5) and padded.tolist() == [[1, 2, 0, 0, 0], [3, 0, 0, 0, 0]]
    with pytest.raises(ValueError):
        pad_batch([])
    with pytest.raises(TypeError):
        pad_batch([[0.5, 1.5]])


# -- load_glove --------------------------------------------------------------------------------

def write_glove(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def vocab():
    # itos: <pad>, <unk>, the, ". . .", cat, zebra
    return Vocabulary([["the", "the", "the", ". . .", ". . .", "cat", "zebra"]])


GLOVE = ["the 0.1 0.2 0.3",
         ". . . 1.0 2.0 3.0",  # a glove.840B-style word containing spaces
         "cat -1 -2 -3.5",
         "dog 9 9 9"]


def test_load_glove_reads_vectors_including_words_with_spaces(tmp_path, vocab):
    path = write_glove(tmp_path / "glove.txt", GLOVE)
    emb, found = load_glove(path, vocab, generator=torch.Generator().manual_seed(3), return_found=True)
    assert emb.dtype == torch.float32 and emb.shape == (len(vocab), 3)
    assert vocab.itos[3] == ". . ."
    assert torch.equal(emb[vocab.index("the")], torch.tensor([0.1, 0.2, 0.3]))
    assert torch.equal(emb[vocab.index(". . .")], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(emb[vocab.index("cat")], torch.tensor([-1.0, -2.0, -3.5]))
    assert torch.equal(emb[PAD_INDEX], torch.zeros(3))
    assert found.tolist() == [False, False, True, True, True, False]
    assert torch.equal(load_glove(path, vocab, dim=3, generator=torch.Generator().manual_seed(3)), emb)


def test_load_glove_unknown_rows_are_seeded_normal(tmp_path, vocab):
    path = write_glove(tmp_path / "glove.txt", GLOVE)
    a = load_glove(path, vocab, generator=torch.Generator().manual_seed(7))
    b = load_glove(path, vocab, generator=torch.Generator().manual_seed(7))
    c = load_glove(path, vocab, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    expected = 0.1 * torch.randn(len(vocab), 3, generator=torch.Generator().manual_seed(7))
    for word in (UNK, "zebra"):
        i = vocab.index(word)
        assert torch.allclose(a[i], expected[i])
        assert not torch.allclose(a[i], c[i])
    assert torch.equal(a[PAD_INDEX], torch.zeros(3)) and torch.equal(c[PAD_INDEX], torch.zeros(3))
    # the default generator is seeded too
    assert torch.equal(load_glove(path, vocab), load_glove(path, vocab))


def test_load_glove_lowercase_and_gzip(tmp_path, vocab):
    lines = ["The 5 5 5", "the 1 1 1", "CAT 2 2 2"]
    path = tmp_path / "glove.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    emb = load_glove(path, vocab, lowercase=True)
    assert emb[vocab.index("the")].tolist() == [5.0, 5.0, 5.0]  # first match wins
    assert emb[vocab.index("cat")].tolist() == [2.0, 2.0, 2.0]
    exact = load_glove(path, vocab)  # without lowercase only "the" matches exactly
    assert exact[vocab.index("the")].tolist() == [1.0, 1.0, 1.0]
    assert exact[vocab.index("cat")].tolist() != [2.0, 2.0, 2.0]


def test_load_glove_short_vector_names_line_number(tmp_path, vocab):
    path = write_glove(tmp_path / "bad_dim.txt", ["the 0.1 0.2 0.3", "cat 1 2 3", "dog 1 2"])
    with pytest.raises(ValueError, match=r"bad_dim\.txt, line 3: expected a word and 3 values, found 2"):
        load_glove(path, vocab)
    # a short vector after a word with spaces is caught too, even for a word not in the vocabulary
    path = write_glove(tmp_path / "bad_dim2.txt", ["the 0.1 0.2 0.3", "- - 1 2", "cat 1 2 3"])
    with pytest.raises(ValueError, match=r"bad_dim2\.txt, line 2: expected a word and 3 numeric values, "
                                         r"but the first value is '-'"):
        load_glove(path, vocab)


def test_load_glove_long_vector_names_line_number(tmp_path, vocab):
    path = write_glove(tmp_path / "bad_dim.txt", ["the 0.1 0.2 0.3", "", "cat 1 2 3 4"])
    with pytest.raises(ValueError, match=r"bad_dim\.txt, line 3: .*inconsistent vector dimension"):
        load_glove(path, vocab)
    # an explicit dim is checked against the first line too
    ok = write_glove(tmp_path / "ok.txt", ["the 0.1 0.2 0.3"])
    with pytest.raises(ValueError, match=r"ok\.txt, line 1: .*found 3 values"):
        load_glove(ok, vocab, dim=4)


def test_load_glove_non_numeric_value(tmp_path, vocab):
    path = write_glove(tmp_path / "words.txt", ["the 0.1 0.2 0.3", "cat 1 x 3"])
    with pytest.raises(ValueError, match=r"words\.txt, line 2: non-numeric vector value 'x'"):
        load_glove(path, vocab)


def test_load_glove_missing_file_and_no_overlap(tmp_path, vocab):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.txt.*one word and its vector per line"):
        load_glove(tmp_path / "nowhere.txt", vocab)
    path = write_glove(tmp_path / "other.txt", ["dog 1 2", "fish 3 4"])
    with pytest.raises(ValueError, match=r"other\.txt: no word of the vocabulary"):
        load_glove(path, vocab)
    empty = write_glove(tmp_path / "empty.txt", [""])
    with pytest.raises(ValueError, match=r"empty\.txt: the GloVe file is empty"):
        load_glove(empty, vocab)



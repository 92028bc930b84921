"""Tests of the loaders of user-supplied data files, on small fixture files in each format."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bilevel.problems.data.user_files import (MissingFieldError, load_amazon_reviews, load_sent140_leaf,
                                              load_snli_infersent, load_table)


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


# -- Sentiment140 (LEAF) -----------------------------------------------------------------------

def tweet(text):
    return ["1467810369", "Mon Apr 06 22:19:45 PDT 2009", "NO_QUERY", "someone", text]


SENT140 = {
    "users": ["alice", "bob"],
    "num_samples": [2, 1],
    "user_data": {
        "alice": {"x": [tweet("I love this"), tweet("so sad today")], "y": ["4", "0"]},
        "bob": {"x": [tweet("meh") + ["extra field"]], "y": [0]},
    },
}


def test_sent140_parses_texts_labels_users(tmp_path):
    data = load_sent140_leaf(write_json(tmp_path / "train.json", SENT140))
    assert data.texts == ["I love this", "so sad today", "meh"]
    assert data.labels.dtype == np.int64 and data.labels.tolist() == [1, 0, 0]
    assert data.users == ["alice", "alice", "bob"]
    texts, labels, users = data  # a NamedTuple unpacks
    assert (texts, labels.tolist(), users) == (data.texts, [1, 0, 0], data.users)


def test_sent140_int_labels_and_label_map(tmp_path):
    obj = json.loads(json.dumps(SENT140))
    obj["user_data"]["alice"]["y"] = [4, "0"]
    assert load_sent140_leaf(write_json(tmp_path / "a.json", obj)).labels.tolist() == [1, 0, 0]
    obj["user_data"]["alice"]["y"] = ["1", "0"]
    data = load_sent140_leaf(write_json(tmp_path / "b.json", obj), label_map={"0": 0, "1": 1})
    assert data.labels.tolist() == [1, 0, 0]


def test_sent140_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train\.json.*LEAF Sentiment140 json.*user_data"):
        load_sent140_leaf(tmp_path / "train.json")


def test_sent140_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"users": ["a"],\n "user_data": {', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON \(line 2.*expected a LEAF"):
        load_sent140_leaf(path)


def test_sent140_missing_key_names_key_and_found_keys(tmp_path):
    path = write_json(tmp_path / "nokey.json", {"users": [], "num_samples": []})
    with pytest.raises(KeyError) as info:
        load_sent140_leaf(path)
    message = str(info.value)
    assert "nokey.json" in message and "'user_data'" in message and "['num_samples', 'users']" in message
    obj = json.loads(json.dumps(SENT140))
    del obj["user_data"]["bob"]["y"]
    with pytest.raises(MissingFieldError,
                       match=r"nokey2\.json: user_data\['bob'\] lacks the key 'y'; found keys \['x'\]"):
        load_sent140_leaf(write_json(tmp_path / "nokey2.json", obj))


def test_sent140_bad_records(tmp_path):
    obj = json.loads(json.dumps(SENT140))
    obj["user_data"]["bob"]["y"] = ["2"]
    with pytest.raises(ValueError, match=r"label\.json: user_data\['bob'\]\['y'\]\[0\] = '2' is not a known label; "
                                         r"expected one of \['0', '4'\]"):
        load_sent140_leaf(write_json(tmp_path / "label.json", obj))
    obj = json.loads(json.dumps(SENT140))
    obj["user_data"]["alice"]["x"][1] = ["too", "short"]
    with pytest.raises(ValueError,
                       match=r"short\.json: user_data\['alice'\]\['x'\]\[1\] must be a list whose element 4"):
        load_sent140_leaf(write_json(tmp_path / "short.json", obj))
    obj = json.loads(json.dumps(SENT140))
    obj["user_data"]["alice"]["y"] = ["4"]
    with pytest.raises(ValueError, match=r"lengths\.json: .*equal length"):
        load_sent140_leaf(write_json(tmp_path / "lengths.json", obj))
    obj = json.loads(json.dumps(SENT140))
    obj["users"] = ["alice"]
    with pytest.raises(ValueError, match=r"unlisted\.json: 1 user\(s\) of 'user_data' are not listed in 'users', "
                                         r"e\.g\. \['bob'\]"):
        load_sent140_leaf(write_json(tmp_path / "unlisted.json", obj))
    obj["users"] = ["alice", "bob", "carol"]
    with pytest.raises(KeyError,
                       match=r"nouser\.json: 'user_data' lacks the key 'carol'; found keys \['alice', 'bob'\]"):
        load_sent140_leaf(write_json(tmp_path / "nouser.json", obj))
    with pytest.raises(ValueError, match=r"list\.json: top level is a JSON list"):
        load_sent140_leaf(write_json(tmp_path / "list.json", [SENT140]))


# -- SNLI (InferSent) --------------------------------------------------------------------------

def write_snli(directory, split, s1, s2, labels):
    directory.mkdir(exist_ok=True)
    for name, lines in (("s1", s1), ("s2", s2), ("labels", labels)):
        (directory / f"{name}.{split}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


S1 = ["A man plays a guitar .", "Two dogs run .", "A child sleeps ."]
S2 = ["A person makes music .", "Cats sit .", "A kid is awake ."]
LABELS = ["entailment", "neutral", "contradiction"]


def test_snli_parses_three_files(tmp_path):
    directory = write_snli(tmp_path / "SNLI", "dev", S1, S2, LABELS)
    data = load_snli_infersent(directory, "dev")
    assert data.premises == S1 and data.hypotheses == S2
    assert data.labels.dtype == np.int64 and data.labels.tolist() == [0, 1, 2]
    short = load_snli_infersent(directory, "dev", max_lines=2)
    assert short.premises == S1[:2] and short.hypotheses == S2[:2] and short.labels.tolist() == [0, 1]


def test_snli_without_final_newline(tmp_path):
    directory = tmp_path / "SNLI"
    directory.mkdir()
    (directory / "s1.test").write_text("a\r\nb", encoding="utf-8")
    (directory / "s2.test").write_text("c\nd", encoding="utf-8")
    (directory / "labels.test").write_text("neutral\nentailment", encoding="utf-8")
    data = load_snli_infersent(directory, "test")
    assert data.premises == ["a", "b"] and data.hypotheses == ["c", "d"] and data.labels.tolist() == [1, 0]


def test_snli_mismatched_line_counts(tmp_path):
    directory = write_snli(tmp_path / "SNLI", "train", S1, S2[:2], LABELS)
    with pytest.raises(ValueError) as info:
        load_snli_infersent(directory, "train")
    message = str(info.value)
    assert "same number of lines" in message
    assert "s1.train has 3 lines" in message and "s2.train has 2 lines" in message
    assert "labels.train has 3 lines" in message


def test_snli_missing_file_and_directory(tmp_path):
    directory = write_snli(tmp_path / "SNLI", "dev", S1, S2, LABELS)
    os.remove(directory / "labels.dev")
    with pytest.raises(FileNotFoundError, match=r"labels\.dev.*s1\.dev, s2\.dev and labels\.dev"):
        load_snli_infersent(directory, "dev")
    with pytest.raises(FileNotFoundError, match=r"SNLI directory not found: .*missing.*s1\.train"):
        load_snli_infersent(tmp_path / "missing", "train")


def test_snli_unknown_label_names_file_and_line(tmp_path):
    directory = write_snli(tmp_path / "SNLI", "dev", S1, S2, ["entailment", "-", "neutral"])
    with pytest.raises(ValueError, match=r"labels\.dev, line 2: unknown label '-'; expected one of "
                                         r"\['entailment', 'neutral', 'contradiction'\]"):
        load_snli_infersent(directory, "dev")


# -- Amazon reviews ----------------------------------------------------------------------------

AMAZON = [
    {"text": "great blender", "label": "positive", "domain": "kitchen"},
    {"text": "broke in a day", "label": "negative", "domain": "kitchen"},
    {"text": "fun read", "label": "positive", "domain": "books"},
]


def test_amazon_parses_records(tmp_path):
    path = write_json(tmp_path / "dataset.json", AMAZON)
    for source in (path, tmp_path):  # the file or its directory
        data = load_amazon_reviews(source)
        assert data.texts == ["great blender", "broke in a day", "fun read"]
        assert data.labels.dtype == np.int64 and data.labels.tolist() == [1, 0, 1]
        assert data.domains == ["kitchen", "kitchen", "books"]


def test_amazon_unknown_label_names_record(tmp_path):
    records = AMAZON + [{"text": "ok", "label": "neutral", "domain": "books"}]
    with pytest.raises(ValueError, match=r"dataset\.json: record 3 has unknown label 'neutral'; "
                                         r"expected 'positive' or 'negative'"):
        load_amazon_reviews(write_json(tmp_path / "dataset.json", records))


def test_amazon_missing_key_and_wrong_shape(tmp_path):
    records = [AMAZON[0], {"text": "no domain", "label": "positive"}]
    with pytest.raises(KeyError) as info:
        load_amazon_reviews(write_json(tmp_path / "dataset.json", records))
    assert str(info.value) == (f"{tmp_path / 'dataset.json'}: record 1 lacks the key 'domain'; "
                               "found keys ['label', 'text']")
    with pytest.raises(ValueError, match=r"other\.json: top level is a JSON dict, expected a list; "
                                         r"expected dataset\.json"):
        load_amazon_reviews(write_json(tmp_path / "other.json", {"data": AMAZON}))


def test_amazon_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset\.json.*list of records.*positive"):
        load_amazon_reviews(tmp_path / "news-data")  # neither the directory nor the file exists


# -- load_table (Hugging Face datasets, offline) -----------------------------------------------

@pytest.fixture
def hf_cache(tmp_path):
    return tmp_path / "hf-cache"


def test_table_csv_string_labels_and_env(tmp_path, hf_cache, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    path = tmp_path / "reviews.csv"
    path.write_text('sentence,polarity,id\n"good, really",pos,7\nbad,neg,8\nfine,pos,9\n', encoding="utf-8")
    data = load_table(path, "sentence", "polarity", cache_dir=hf_cache)
    assert data.texts == ["good, really", "bad", "fine"]
    assert data.label_names == ["neg", "pos"] and data.labels.tolist() == [1, 0, 1]
    assert data.extra == {"id": [7, 8, 9]}
    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
    # the training split's label list keeps the coding of another split
    test = tmp_path / "test.csv"
    test.write_text("sentence,polarity\nok,pos\n", encoding="utf-8")
    coded = load_table(test, "sentence", "polarity", label_names=["neg", "pos"], cache_dir=hf_cache)
    assert coded.labels.tolist() == [1] and coded.label_names == ["neg", "pos"]
    assert load_table(test, "sentence", "polarity", cache_dir=hf_cache).labels.tolist() == [0]
    with pytest.raises(ValueError, match=r"test\.csv, row 0: label 'pos' in column 'polarity' is not one of"):
        load_table(test, "sentence", "polarity", label_names=["a", "b"], cache_dir=hf_cache)


def test_table_trec_style_parquet_and_jsonl(tmp_path, hf_cache):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = {"text": ["How far is it from Denver to Aspen ?", "What is a fuel cell ?", "Who wrote Hamlet ?"],
            "coarse_label": [5, 2, 3], "fine_label": [40, 24, 29]}
    pq.write_table(pa.table(rows), tmp_path / "trec_test.parquet")
    data = load_table(tmp_path / "trec_test.parquet", "text", "coarse_label", cache_dir=hf_cache)
    assert data.texts == rows["text"]
    assert data.labels.dtype == np.int64 and data.labels.tolist() == [5, 2, 3]  # ints kept as they are
    assert data.label_names == [2, 3, 5] and data.extra == {"fine_label": [40, 24, 29]}
    jsonl = tmp_path / "trec.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "label": c}) for t, c in zip(rows["text"], "ABA")) + "\n")
    js = tmp_path / "trec.json"
    js.write_text(json.dumps([{"text": "x", "label": "B"}, {"text": "y", "label": "C"}]))
    splits = {"train": jsonl, "test": js}
    train = load_table(splits, "text", "label", split="train", cache_dir=hf_cache)
    assert train.texts == rows["text"] and train.labels.tolist() == [0, 1, 0] and train.label_names == ["A", "B"]
    assert load_table(splits, "text", "label", split="test", cache_dir=hf_cache).labels.tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"several splits \['test', 'train'\]"):
        load_table(splits, "text", "label", cache_dir=hf_cache)


def test_table_tsv(tmp_path, hf_cache):
    path = tmp_path / "data.tsv"
    path.write_text("text\tlabel\nhello, world\tb\nbye\ta\n", encoding="utf-8")
    data = load_table(path, "text", "label", cache_dir=hf_cache)
    assert data.texts == ["hello, world", "bye"] and data.labels.tolist() == [1, 0]


def test_table_missing_column_lists_columns(tmp_path, hf_cache):
    path = tmp_path / "cols.csv"
    path.write_text("sentence,polarity\nhi,pos\n", encoding="utf-8")
    with pytest.raises(KeyError) as info:
        load_table(path, "text", "polarity", cache_dir=hf_cache)
    assert str(info.value) == f"{path}: no column 'text'; found columns ['sentence', 'polarity']"
    with pytest.raises(KeyError, match=r"cols\.csv: no column 'label'; found columns \['sentence', 'polarity'\]"):
        load_table(path, "sentence", "label", cache_dir=hf_cache)


def test_table_bad_files(tmp_path, hf_cache):
    with pytest.raises(FileNotFoundError, match=r"absent\.csv.*with the columns 'text' and 'label'"):
        load_table(tmp_path / "absent.csv", "text", "label", cache_dir=hf_cache)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": "x"}\n{"text": oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl: could not be read as json.*columns 'text' and 'label'"):
        load_table(broken, "text", "label", cache_dir=hf_cache)
    fake = tmp_path / "fake.parquet"
    fake.write_text("not a parquet file", encoding="utf-8")
    with pytest.raises(ValueError, match=r"fake\.parquet: could not be read as parquet"):
        load_table(fake, "text", "label", cache_dir=hf_cache)
    odd = tmp_path / "data.xlsx"
    odd.write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.xlsx: cannot tell the table format"):
        load_table(odd, "text", "label", cache_dir=hf_cache)
    holes = tmp_path / "holes.csv"
    holes.write_text("text,label\na,x\n,y\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"holes\.csv, row 1: empty 'text' cell"):
        load_table(holes, "text", "label", cache_dir=hf_cache)


def test_table_without_datasets_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "a.csv"
    path.write_text("text,label\nhi,x\n", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"pip install datasets"):
        load_table(path, "text", "label")


def test_modules_do_not_import_datasets_at_import_time():
    code = ("import sys, bilevel.problems.data.user_files, bilevel.problems.data.text; "
            "print(sorted(m for m in ('datasets', 'pandas', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("content, line, rule", [
    # the last row lost its last field (a download cut off mid-row)
    ('text,label,id\n"good film",pos,1\n"bad film",neg,2\n"so-so",neg\n', 4, r"2 field\(s\) where the header has 3"),
    ('text,label\n"good film",pos\nbad,neg\n"so-so"\n', 4, r"1 field\(s\) where the header has 2"),
    # an unterminated quoted field at the end of the file
    ('text,label\n"good film",pos\n"bad film",neg\n"so-so, and then', 4, r"a quoted field opened on this line is never closed"),
])
def test_table_truncated_csv_is_an_error_naming_file_and_line(tmp_path, hf_cache, content, line, rule):
    path = tmp_path / "cut.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"cut\.csv, line {line}: {rule}.*truncated"):
        load_table(path, "text", "label", cache_dir=hf_cache)


def test_table_csv_with_multiline_quotes_and_blank_lines_is_complete(tmp_path, hf_cache):
    path = tmp_path / "ok.csv.gz"
    import gzip
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write('text,label\n"two\nlines, one field",pos\n\n"bad film",neg\n')
    data = load_table(path, "text", "label", cache_dir=hf_cache)
    assert data.texts == ["two\nlines, one field", "bad film"] and data.labels.tolist() == [1, 0]
    cut = tmp_path / "cut.tsv.bz2"
    import bz2
    with bz2.open(cut, "wt", encoding="utf-8") as fh:
        fh.write("text\tlabel\nhello\ta\nbye\n")
    with pytest.raises(ValueError, match=r"cut\.tsv\.bz2, line 3: 1 field\(s\) where the header has 2"):
        load_table(cut, "text", "label", cache_dir=hf_cache)

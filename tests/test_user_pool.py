"""A data-selection pool and validation set from the user's own files (jsonl, parquet, txt)."""
import json

import pytest

pytest.importorskip("datasets")

from bilevel.problems.data.user_files import MissingFieldError
from bilevel.problems.data.user_pool import load_user_cloze, load_user_documents, load_user_pool


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def long_text(n, last="omega"):
    return " ".join(WORDS[i % len(WORDS)] for i in range(n - 1)) + f" {last}."


def test_jsonl_pool_keeps_ids_and_sources_and_drops_empty(tmp_path):
    path = write_jsonl(tmp_path / "pool.jsonl", [
        {"id": "a", "source": "web", "text": "first document"},
        {"id": "b", "source": "books", "text": "  second document  "},
        {"id": "c", "source": "web", "text": "   "},
    ])
    docs = load_user_documents(path)
    assert [(d.id, d.source, d.text, d.noise) for d in docs] == [("a", "web", "first document", ""),
                                                                   ("b", "books", "second document", "")]


def test_txt_pool_is_one_document_per_paragraph_with_file_provenance(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("para one line one\npara one line two\n\npara two\n\n\npara three\n", encoding="utf-8")
    docs = load_user_documents(path)
    assert [d.id for d in docs] == ["corpus/0", "corpus/1", "corpus/2"]
    assert docs[0].text == "para one line one\npara one line two" and docs[2].text == "para three"
    assert {d.source for d in docs} == {"corpus"}
    assert len(load_user_documents(path, sample_by="line")) == 4
    with pytest.raises(ValueError, match="sample_by"):
        load_user_documents(path, sample_by="sentence")


def test_parquet_pool_and_custom_text_column(tmp_path):
    import pandas as pd
    path = tmp_path / "pool.parquet"
    pd.DataFrame({"body": ["x y z", "u v"], "source": ["s1", "s2"]}).to_parquet(path)
    docs = load_user_documents(path, text_column="body")
    assert [(d.id, d.source, d.text) for d in docs] == [("pool/0", "s1", "x y z"), ("pool/1", "s2", "u v")]
    with pytest.raises(MissingFieldError, match=r"no column 'text'.*body"):
        load_user_documents(path)


def test_validation_table_with_context_and_target_is_used_as_is(tmp_path):
    path = write_jsonl(tmp_path / "val.jsonl", [{"context": "the cat sat on the", "target": "mat"},
                                                {"context": "once upon a", "target": "time"}])
    val = load_user_cloze(path)
    assert [(c.context, c.target) for c in val] == [("the cat sat on the", "mat"), ("once upon a", "time")]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"context": "x", "target": ""}])
    with pytest.raises(ValueError, match="row 0: empty"):
        load_user_cloze(bad)


def test_validation_documents_are_cut_into_last_word_passages(tmp_path):
    path = write_jsonl(tmp_path / "val.jsonl", [{"text": long_text(25, "finale")}])
    val = load_user_cloze(path, cloze_words=25)
    assert len(val) == 1 and val[0].target == "finale" and len(val[0].context.split()) == 24
    with pytest.raises(ValueError, match="lower cloze_words"):
        load_user_cloze(path, cloze_words=60)


def test_load_user_pool_builds_disjoint_splits(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"id": f"p{i}", "text": f"doc {i} text"} for i in range(5)])
    pool2 = tmp_path / "more.txt"
    pool2.write_text("extra one\n\nextra two\n", encoding="utf-8")
    val = write_jsonl(tmp_path / "val.jsonl", [{"context": "a b", "target": "c"}])
    test_in = write_jsonl(tmp_path / "test.jsonl", [{"id": "t0", "text": "held out"}])
    test_out = write_jsonl(tmp_path / "ood.jsonl", [{"id": "o0", "source": "code", "text": "def f(): pass"}])
    splits = load_user_pool([pool, pool2], val, test_in, test_out)
    assert [d.id for d in splits.pool] == [f"p{i}" for i in range(5)] + ["more/0", "more/1"]
    assert [d.id for d in splits.test_in] == ["t0"] and splits.out_of_domain == ("code",)
    assert len(splits.validation) == 1
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": "p1", "text": "leaked"}])
    with pytest.raises(ValueError, match=r"'p1' appears in pool and in test_in"):
        load_user_pool(pool, val, dup)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_user_pool(tmp_path / "missing.jsonl", val)

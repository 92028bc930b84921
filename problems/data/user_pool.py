"""A data-selection pool and validation set from the user's own files, as an alternative to the
offline text pool (:mod:`bilevel.problems.data.text_pool`), so that BLISS can select from any
corpus.

Files are read through Hugging Face ``datasets`` in offline mode (the same import and format
rules as :func:`bilevel.problems.data.user_files.load_table`):

* ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` / ``.tsv`` (optionally compressed): one document
  per record, its text in ``text_column`` (default ``"text"``); optional ``id`` and ``source``
  columns give the provenance (defaults: ``"<file stem>/<row>"`` and the file stem);
* ``.txt``: one document per paragraph (blank-line separated), or per line with
  ``sample_by="line"``, or the whole file with ``sample_by="document"``.

The validation set is a last-word cloze (LAMBADA, Paperno et al. 2016): a table with
``context`` and ``target`` columns is used as it is; any other validation file is cut into
passages by :func:`~bilevel.problems.data.text_pool.cloze_passages`. Test files are optional
(in-domain and out-of-domain held-out text). User documents carry no planted noise (``noise``
is ``""``), so noise metrics are ``nan`` on them; ids must be unique across all files, and a
document id shared between the pool and a held-out file is an error (the splits must be
disjoint).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence

from .text_pool import Cloze, Document, TextSplits, cloze_passages
from .user_files import MissingFieldError, PathLike, _import_datasets, _require_file, _strip_compression, _table_format

__all__ = ["load_user_documents", "load_user_cloze", "load_user_pool"]

SAMPLE_BY = ("paragraph", "line", "document")


def _load(path: str, what: str, sample_by: str, cache_dir: Optional[PathLike]):
    _require_file(path, what, "a .jsonl, .json, .parquet, .csv, .tsv or .txt file of documents")
    datasets = _import_datasets()
    if _strip_compression(path).endswith(".txt"):
        if sample_by not in SAMPLE_BY:
            raise ValueError(f"sample_by={sample_by!r}: must be one of {SAMPLE_BY}")
        fmt, kwargs = "text", {"sample_by": sample_by}
    else:
        fmt, kwargs = _table_format(path), {}
        if _strip_compression(path).endswith(".tsv"):
            kwargs["delimiter"] = "\t"
    try:
        return datasets.load_dataset(fmt, data_files={"train": path}, split="train",
                                     cache_dir=None if cache_dir is None else os.fspath(cache_dir), **kwargs)
    except Exception as exc:  # datasets wraps parser errors in several exception types
        raise ValueError(f"{path}: could not be read as {fmt} by datasets.load_dataset ({type(exc).__name__}: "
                         f"{exc})") from exc


def load_user_documents(path: PathLike, text_column: str = "text", sample_by: str = "paragraph",
                        cache_dir: Optional[PathLike] = None) -> List[Document]:
    """The documents of one file (see the module docstring); empty texts are dropped."""
    path = os.fspath(path)
    table = _load(path, "document file", sample_by, cache_dir)
    stem = Path(_strip_compression(path)).name.split(".")[0]
    columns = list(table.column_names)
    if text_column not in columns:
        raise MissingFieldError(f"{path}: no column {text_column!r}; found columns {columns} "
                                f"(set text_column)")
    ids = table["id"] if "id" in columns else None
    sources = table["source"] if "source" in columns else None
    docs: List[Document] = []
    for row, text in enumerate(table[text_column]):
        if text is None or not str(text).strip():
            continue
        doc_id = str(ids[row]) if ids is not None else f"{stem}/{row}"
        source = str(sources[row]) if sources is not None else stem
        docs.append(Document(doc_id, source, doc_id, str(text).strip()))
    if not docs:
        raise ValueError(f"{path}: no non-empty document in column {text_column!r}")
    return docs


def load_user_cloze(path: PathLike, text_column: str = "text", cloze_words: int = 60,
                    cloze_per_document: int = 3, sample_by: str = "paragraph",
                    cache_dir: Optional[PathLike] = None) -> List[Cloze]:
    """Cloze passages: the rows of a table with ``context`` and ``target`` columns, else cut from
    the file's documents (``cloze_words`` words each, up to ``cloze_per_document`` per document)."""
    path = os.fspath(path)
    table = _load(path, "validation file", sample_by, cache_dir)
    columns = list(table.column_names)
    if "context" in columns and "target" in columns:
        out = []
        for row, (c, t) in enumerate(zip(table["context"], table["target"])):
            if not c or not t or not str(t).strip():
                raise ValueError(f"{path}, row {row}: empty 'context' or 'target' cell")
            out.append(Cloze(f"val/{row}", f"val/{row}", f"val/{row}", str(c).strip(), str(t).strip()))
        return out
    docs = load_user_documents(path, text_column, sample_by, cache_dir)
    out = [p for d in docs for p in cloze_passages(d, words=cloze_words, max_passages=cloze_per_document)]
    if not out:
        raise ValueError(f"{path}: no document has {cloze_words} words ending in an alphabetic word; "
                         f"lower cloze_words or give a table with 'context' and 'target' columns")
    return out


def load_user_pool(pool: PathLike | Sequence[PathLike], validation: PathLike,
                   test_in: Optional[PathLike] = None, test_out: Optional[PathLike] = None, *,
                   text_column: str = "text", sample_by: str = "paragraph", cloze_words: int = 60,
                   cloze_per_document: int = 3, cache_dir: Optional[PathLike] = None) -> TextSplits:
    """:class:`~bilevel.problems.data.text_pool.TextSplits` from the user's files (one pool file or
    several, concatenated in order). Errors name the file and the rule broken."""
    pool_paths = [pool] if isinstance(pool, (str, os.PathLike)) else list(pool)
    if not pool_paths:
        raise ValueError("load_user_pool: no pool file given")
    docs = [d for p in pool_paths for d in load_user_documents(p, text_column, sample_by, cache_dir)]
    val = load_user_cloze(validation, text_column, cloze_words, cloze_per_document, sample_by, cache_dir)
    tin = load_user_documents(test_in, text_column, sample_by, cache_dir) if test_in is not None else []
    tout = load_user_documents(test_out, text_column, sample_by, cache_dir) if test_out is not None else []
    seen = {}
    for name, part in (("pool", docs), ("test_in", tin), ("test_out", tout)):
        for d in part:
            if d.id in seen:
                raise ValueError(f"load_user_pool: document id {d.id!r} appears in {seen[d.id]} and in {name}; "
                                 "ids must be unique and the splits disjoint")
            seen[d.id] = name
    held_out = {c.doc_id for c in val} & {d.id for d in docs}
    if held_out:
        raise ValueError(f"load_user_pool: validation document(s) {sorted(held_out)[:5]} are also in the pool; "
                         "the splits must be disjoint")
    return TextSplits(docs, val, tin, tout, tuple(sorted({d.source for d in tout})))

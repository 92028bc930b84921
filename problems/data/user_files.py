"""Loaders for the papers' data sets from files the user supplies (nothing is downloaded).

Formats (as used by the official BO-REP / SLIP / AccBO / AdamBO code):

* Sentiment140, LEAF json (:func:`load_sent140_leaf`): ``{"users": [...], "user_data":
  {user: {"x": [[id, date, query, user, text, ...], ...], "y": ["0" | "4", ...]}}}``.
* SNLI, InferSent layout (:func:`load_snli_infersent`): ``s1.{split}``, ``s2.{split}``,
  ``labels.{split}`` in one directory, one item per line.
* Amazon reviews, ``dataset.json`` of ``mailong25/meta-learning-bert``
  (:func:`load_amazon_reviews`): a list of ``{"text", "label", "domain"}`` records.
* Any csv / tsv / json / jsonl / parquet table, e.g. a local TREC export
  (:func:`load_table`), read through Hugging Face ``datasets`` in offline mode.

Each loader returns a NamedTuple of plain Python lists and int64 numpy label arrays. Errors
name the file: ``FileNotFoundError`` (with the expected layout) for a missing file,
``ValueError`` (with the line or record) for a malformed one, and :class:`MissingFieldError`
(a ``KeyError`` and ``ValueError``) naming the missing key and the keys that were found.

``datasets`` (with pyarrow and pandas) is optional and imported only inside :func:`load_table`.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

__all__ = [
    "MissingFieldError", "SENT140_LABELS", "SNLI_LABELS", "AMAZON_LABELS",
    "Sent140Data", "SNLIData", "AmazonReviewsData", "TableData",
    "load_sent140_leaf", "load_snli_infersent", "load_amazon_reviews", "load_table",
]

PathLike = Union[str, os.PathLike]

#: LEAF Sentiment140 polarity -> class index (0 = negative, 4 = positive).
SENT140_LABELS = {"0": 0, "4": 1}
#: InferSent SNLI label names, in class-index order.
SNLI_LABELS = ("entailment", "neutral", "contradiction")
#: Amazon-review label -> class index.
AMAZON_LABELS = {"negative": 0, "positive": 1}


class MissingFieldError(KeyError, ValueError):
    """A file lacks a required key or column. The message names the file, the missing key and
    the keys that were found. Catchable as ``KeyError`` or ``ValueError``."""

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0]) if self.args else ""


class Sent140Data(NamedTuple):
    texts: List[str]
    labels: np.ndarray  # int64, 0 = negative, 1 = positive
    users: List[str]  # the user of each example


class SNLIData(NamedTuple):
    premises: List[str]  # s1
    hypotheses: List[str]  # s2
    labels: np.ndarray  # int64, 0/1/2 = entailment/neutral/contradiction


class AmazonReviewsData(NamedTuple):
    texts: List[str]
    labels: np.ndarray  # int64, 1 = positive, 0 = negative
    domains: List[str]


class TableData(NamedTuple):
    texts: List[str]
    labels: np.ndarray  # int64 class indices (string labels) or the integer labels themselves
    label_names: list  # sorted distinct labels; labels[i] indexes it for string labels
    extra: Dict[str, list]  # the other columns


# -- helpers -----------------------------------------------------------------------------------

def _require_file(path: str, what: str, expected: str) -> None:
    if os.path.isdir(path):
        raise FileNotFoundError(f"{what}: {path!r} is a directory, expected a file; expected {expected}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!r}; expected {expected}")


def _read_json(path: str, expected: str) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                         f"expected {expected}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc}); expected {expected}") from None


def _missing(path: str, where: str, key: str, found) -> MissingFieldError:
    return MissingFieldError(f"{path}: {where} lacks the key {key!r}; found keys {sorted(map(str, found))}")


def _type_name(v: Any) -> str:
    return type(v).__name__


# -- Sentiment140 (LEAF) -------------------------------------------------------------------------

_SENT140_LAYOUT = ('a LEAF Sentiment140 json file {"users": [...], "user_data": {user: {"x": '
                   '[[id, date, query, user, text, ...], ...], "y": ["0" | "4", ...]}}} '
                   '(e.g. data/sent140/train.json)')


def load_sent140_leaf(path: PathLike, label_map: Optional[Mapping[str, int]] = None) -> Sent140Data:
    """Read a LEAF Sentiment140 json file.

    The tweet text is ``x[i][4]``; labels ``"0"`` -> 0 and ``"4"`` -> 1 (ints 0/4 accepted too;
    pass ``label_map`` for another coding, keys as strings, e.g. ``{"0": 0, "1": 1}``). Users are
    read in the order of ``"users"``; every key of ``"user_data"`` must be listed there.
    Returns texts, labels (int64) and the user of each example.
    """
    path = os.fspath(path)
    _require_file(path, "Sentiment140 LEAF file", _SENT140_LAYOUT)
    label_map = dict(SENT140_LABELS if label_map is None else {str(k): int(v) for k, v in label_map.items()})
    data = _read_json(path, _SENT140_LAYOUT)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level is a JSON {_type_name(data)}, expected an object; "
                         f"expected {_SENT140_LAYOUT}")
    for key in ("users", "user_data"):
        if key not in data:
            raise _missing(path, "the top-level object", key, data.keys())
    users, user_data = data["users"], data["user_data"]
    if not isinstance(users, list):
        raise ValueError(f"{path}: 'users' is a {_type_name(users)}, expected a list of user names")
    if not isinstance(user_data, dict):
        raise ValueError(f"{path}: 'user_data' is a {_type_name(user_data)}, expected an object user -> {{x, y}}")
    listed = {str(u) for u in users}
    unlisted = [u for u in user_data if u not in listed]
    if unlisted:
        raise ValueError(f"{path}: {len(unlisted)} user(s) of 'user_data' are not listed in 'users', "
                         f"e.g. {unlisted[:5]}")
    texts: List[str] = []
    labels: List[int] = []
    owners: List[str] = []
    for user in users:
        user = str(user)
        if user not in user_data:
            raise _missing(path, "'user_data'", user, list(user_data)[:20])
        record = user_data[user]
        if not isinstance(record, dict):
            raise ValueError(f"{path}: user_data[{user!r}] is a {_type_name(record)}, "
                             "expected an object with 'x' and 'y'")
        for key in ("x", "y"):
            if key not in record:
                raise _missing(path, f"user_data[{user!r}]", key, record.keys())
        xs, ys = record["x"], record["y"]
        if not isinstance(xs, list) or not isinstance(ys, list) or len(xs) != len(ys):
            raise ValueError(f"{path}: user_data[{user!r}] must hold lists 'x' and 'y' of equal length, "
                             f"got {_type_name(xs)} of length {len(xs) if isinstance(xs, list) else '-'} "
                             f"and {_type_name(ys)} of length {len(ys) if isinstance(ys, list) else '-'}")
        for i, (x, y) in enumerate(zip(xs, ys)):
            if not isinstance(x, list) or len(x) < 5 or not isinstance(x[4], str):
                raise ValueError(f"{path}: user_data[{user!r}]['x'][{i}] must be a list whose element 4 is "
                                 f"the tweet text, got {str(x)[:80]}")
            key = str(y) if isinstance(y, str) or (isinstance(y, int) and not isinstance(y, bool)) else None
            if key is None or key.strip() not in label_map:
                raise ValueError(f"{path}: user_data[{user!r}]['y'][{i}] = {y!r} is not a known label; "
                                 f"expected one of {sorted(label_map)} (pass label_map for another coding)")
            texts.append(x[4])
            labels.append(label_map[key.strip()])
            owners.append(user)
    return Sent140Data(texts, np.asarray(labels, dtype=np.int64), owners)


# -- SNLI (InferSent layout) ----------------------------------------------------------------------

def _read_lines(path: str) -> List[str]:
    try:
        with open(path, "r", encoding="utf-8", newline="") as f:
            return [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc}); expected one item per line") from None


def load_snli_infersent(directory: PathLike, split: str, max_lines: Optional[int] = None) -> SNLIData:
    """Read SNLI in the InferSent layout: ``s1.{split}``, ``s2.{split}``, ``labels.{split}``.

    ``s1`` holds the premises, ``s2`` the hypotheses and ``labels`` one of ``entailment``,
    ``neutral``, ``contradiction`` (-> 0, 1, 2) per line; the three files must have the same
    number of lines. ``max_lines`` keeps the first lines only (the ACCBO code keeps 10,000 per
    split), after the line counts of the whole files have been checked.
    """
    directory = os.fspath(directory)
    split = str(split)
    names = [f"s1.{split}", f"s2.{split}", f"labels.{split}"]
    layout = (f"a directory with the InferSent SNLI files {names[0]}, {names[1]} and {names[2]} "
              "(premise, hypothesis and entailment/neutral/contradiction label, one per line)")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"SNLI directory not found: {directory!r}; expected {layout}")
    if max_lines is not None and (isinstance(max_lines, bool) or not isinstance(max_lines, int) or max_lines < 0):
        raise ValueError(f"max_lines must be None or an int >= 0, got {max_lines!r}")
    paths = [os.path.join(directory, name) for name in names]
    for p in paths:
        _require_file(p, "SNLI file", layout)
    s1, s2, raw = (_read_lines(p) for p in paths)
    counts = [len(s1), len(s2), len(raw)]
    if len(set(counts)) != 1:
        detail = ", ".join(f"{p} has {c} lines" for p, c in zip(paths, counts))
        raise ValueError(f"SNLI files must have the same number of lines: {detail}")
    if max_lines is not None:
        s1, s2, raw = s1[:max_lines], s2[:max_lines], raw[:max_lines]
    index = {name: i for i, name in enumerate(SNLI_LABELS)}
    labels = np.empty(len(raw), dtype=np.int64)
    for lineno, label in enumerate(raw, start=1):
        value = index.get(label.strip())
        if value is None:
            raise ValueError(f"{paths[2]}, line {lineno}: unknown label {label[:40]!r}; "
                             f"expected one of {list(SNLI_LABELS)}")
        labels[lineno - 1] = value
    return SNLIData(s1, s2, labels)


# -- Amazon reviews -------------------------------------------------------------------------------

_AMAZON_LAYOUT = ('dataset.json: a JSON list of records {"text": ..., "label": "positive" | '
                  '"negative", "domain": ...} (the meta-learning-bert Amazon-review file)')


def load_amazon_reviews(path: PathLike) -> AmazonReviewsData:
    """Read the Amazon-review ``dataset.json`` (``path`` is the file or its directory).

    Each record needs ``text``, ``label`` (``positive`` -> 1, ``negative`` -> 0; compared after
    stripping and lower-casing) and ``domain``. Returns texts, labels (int64) and domains.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "dataset.json")
    _require_file(path, "Amazon-review file", _AMAZON_LAYOUT)
    data = _read_json(path, _AMAZON_LAYOUT)
    if not isinstance(data, list):
        raise ValueError(f"{path}: top level is a JSON {_type_name(data)}, expected a list; expected {_AMAZON_LAYOUT}")
    texts: List[str] = []
    labels = np.empty(len(data), dtype=np.int64)
    domains: List[str] = []
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {i} is a {_type_name(record)}, expected an object "
                             "with 'text', 'label' and 'domain'")
        for key in ("text", "label", "domain"):
            if key not in record:
                raise _missing(path, f"record {i}", key, record.keys())
        text, label, domain = record["text"], record["label"], record["domain"]
        if not isinstance(text, str):
            raise ValueError(f"{path}: record {i} has a non-string 'text' ({_type_name(text)})")
        value = AMAZON_LABELS.get(label.strip().lower()) if isinstance(label, str) else None
        if value is None:
            raise ValueError(f"{path}: record {i} has unknown label {label!r}; expected 'positive' or 'negative'")
        texts.append(text)
        labels[i] = value
        domains.append(str(domain))
    return AmazonReviewsData(texts, labels, domains)


# -- generic tables through Hugging Face datasets -------------------------------------------------

_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zip")


def _strip_compression(path: str) -> str:
    name = path.lower()
    for ext in _COMPRESSION:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _table_format(path: str) -> str:
    name = _strip_compression(path)
    for ext, fmt in _FORMATS.items():
        if name.endswith(ext):
            return fmt
    raise ValueError(f"{path}: cannot tell the table format from the file name; expected one of "
                     f"{sorted(_FORMATS)} (optionally compressed: {list(_COMPRESSION)}) or pass format=")


def _open_text(path: str):
    """``path`` as text, decompressing .gz / .bz2 / .xz; None for another compression."""
    name = path.lower()
    if name.endswith(".gz"):
        import gzip
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    if name.endswith(".bz2"):
        import bz2
        return bz2.open(path, "rt", encoding="utf-8", newline="")
    if name.endswith(".xz"):
        import lzma
        return lzma.open(path, "rt", encoding="utf-8", newline="")
    if name.endswith((".zst", ".zip")):
        return None
    return open(path, "r", encoding="utf-8", newline="")


def check_csv_complete(path: str, delimiter: str = ",", quotechar: str = '"') -> None:
    """Raise ``ValueError`` naming ``path`` and the line when the csv file looks truncated.

    pandas (behind ``datasets``) fills the missing fields of a short row with nulls and reports
    an unterminated quote only as "EOF inside string", so a file cut off mid-row would otherwise
    load with a silently incomplete last row. Two defects are caught here, with the 1-based
    line where the record starts: a record with fewer fields than the header, and a quoted field
    still open at the end of the file. Blank lines are skipped (pandas skips them too); a file
    this reader cannot parse for another reason is left to ``datasets`` to report.
    """
    handle = _open_text(path)
    if handle is None:
        return
    with handle:
        reader = csv.reader(handle, delimiter=delimiter, quotechar=quotechar, strict=True)
        header, start = None, 1
        try:
            for record in reader:
                line, start = start, reader.line_num + 1
                if not record:
                    continue
                if header is None:
                    header = record
                elif len(record) < len(header):
                    raise ValueError(
                        f"{path}, line {line}: {len(record)} field(s) where the header has {len(header)} "
                        f"({', '.join(header)}); the file looks truncated or the row is malformed")
        except csv.Error as exc:
            if "unexpected end of data" in str(exc):
                raise ValueError(f"{path}, line {start}: a quoted field opened on this line is never closed; "
                                 f"the file looks truncated") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc})") from None


def _import_datasets():
    """Import ``datasets`` in offline mode (local files only; no Hub look-ups)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets  # optional and heavy (pyarrow + pandas): imported only here
    except ImportError as exc:
        raise ImportError("load_table reads csv/json/parquet files through Hugging Face `datasets`, "
                          "which is not installed; install it with `pip install datasets`") from exc
    return datasets


def load_table(path: Union[PathLike, Mapping[str, PathLike]], text_column: str, label_column: str,
               split: Optional[str] = None, label_names: Optional[Sequence] = None,
               format: Optional[str] = None, cache_dir: Optional[PathLike] = None,
               **load_kwargs) -> TableData:
    """Read a local csv / tsv / json / jsonl / parquet table with Hugging Face ``datasets``.

    ``path`` is one file, or a mapping split name -> file (for example ``{"train": ...,
    "test": ...}``) of which ``split`` picks one (needed when there are several). The format
    follows the extension (``.tsv`` is read as csv with a tab delimiter) unless ``format`` is
    ``"csv"``, ``"json"`` or ``"parquet"``. ``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1``
    are set before ``datasets`` is imported; ``cache_dir`` goes to ``load_dataset`` (where
    ``datasets`` writes its Arrow cache); other keyword arguments too (e.g. ``delimiter``).

    Labels: string labels map to their index in ``label_names`` (default: the sorted distinct
    labels of this file; pass the training split's list to keep the coding of other splits),
    integer labels (e.g. TREC's ``coarse_label``) are kept as they are and ``label_names`` is
    the sorted distinct values. The remaining columns come back in ``extra``.

    Errors: ``ImportError`` if ``datasets`` is missing, ``FileNotFoundError`` for a missing file,
    :class:`MissingFieldError` (a ``KeyError``) naming a missing column and listing the columns,
    ``ValueError`` naming the file for an unreadable table, a truncated csv (a last row short of
    fields or an unterminated quoted field: :func:`check_csv_complete`, with its line), an empty
    text/label cell (with its row) or a label outside ``label_names``.
    """
    if isinstance(path, Mapping):
        files = {str(k): os.fspath(v) for k, v in path.items()}
        if not files:
            raise ValueError("load_table: the mapping of split -> file is empty")
        if split is None:
            if len(files) != 1:
                raise ValueError(f"load_table: several splits {sorted(files)}; pass split= to pick one")
            split = next(iter(files))
        if split not in files:
            raise ValueError(f"load_table: split {split!r} not among the given files {sorted(files)}")
        file = files[split]
    else:
        file = os.fspath(path)
        split = "train" if split is None else str(split)
    expected = (f"a table file (csv, tsv, json, jsonl or parquet) with the columns "
                f"{text_column!r} and {label_column!r}")
    _require_file(file, "table file", expected)
    fmt = format or _table_format(file)
    if fmt not in ("csv", "json", "parquet"):
        raise ValueError(f"format must be 'csv', 'json' or 'parquet', got {fmt!r}")
    if fmt == "csv" and _strip_compression(file).endswith(".tsv"):
        load_kwargs.setdefault("delimiter", "\t")
    if fmt == "csv":
        check_csv_complete(file, load_kwargs.get("delimiter", load_kwargs.get("sep", ",")),
                           load_kwargs.get("quotechar", '"'))
    datasets = _import_datasets()
    try:
        table = datasets.load_dataset(fmt, data_files={split: file}, split=split,
                                      cache_dir=None if cache_dir is None else os.fspath(cache_dir),
                                      **load_kwargs)
    except Exception as exc:  # datasets wraps parser errors in several exception types
        cause = exc.__cause__ or exc.__context__
        detail = f"{type(exc).__name__}: {exc}" + (f" (caused by {type(cause).__name__}: {cause})" if cause else "")
        raise ValueError(f"{file}: could not be read as {fmt} by datasets.load_dataset; expected {expected}. "
                         f"{detail}") from exc
    columns = list(table.column_names)
    for col in (text_column, label_column):
        if col not in columns:
            raise MissingFieldError(f"{file}: no column {col!r}; found columns {columns}")
    texts_raw = table[text_column]
    labels_raw = table[label_column]
    texts: List[str] = []
    for row, t in enumerate(texts_raw):
        if t is None:
            raise ValueError(f"{file}, row {row}: empty {text_column!r} cell")
        texts.append(str(t))
    for row, y in enumerate(labels_raw):
        if y is None:
            raise ValueError(f"{file}, row {row}: empty {label_column!r} cell")
    integer = all(isinstance(y, (int, np.integer)) for y in labels_raw)
    if label_names is None:
        names = sorted({int(y) for y in labels_raw} if integer else {str(y) for y in labels_raw})
    else:
        names = list(label_names)
    if integer and label_names is None:
        labels = np.asarray([int(y) for y in labels_raw], dtype=np.int64)
    else:
        index = {str(n): i for i, n in enumerate(names)}
        labels = np.empty(len(labels_raw), dtype=np.int64)
        for row, y in enumerate(labels_raw):
            value = index.get(str(y))
            if value is None:
                raise ValueError(f"{file}, row {row}: label {y!r} in column {label_column!r} is not one of "
                                 f"label_names {names}")
            labels[row] = value
    extra = {c: list(table[c]) for c in columns if c not in (text_column, label_column)}
    return TableData(texts, labels, names, extra)

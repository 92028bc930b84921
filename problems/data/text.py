"""The text pipeline: tokenizer, vocabulary, padding and GloVe vectors.

Nothing here touches the network. GloVe vectors are read from a file the user supplies (for
example ``glove.840B.300d.txt`` or ``glove.6B.100d.txt``).

Typical use::

    tokens = [tokenize(t) for t in texts]
    vocab = Vocabulary(tokens, min_freq=2, max_size=20000)
    ids, lengths = pad_batch([vocab.encode(t) for t in tokens], max_len=64)
    emb = load_glove("glove.6B.100d.txt", vocab, generator=torch.Generator().manual_seed(0))

Every random choice is seeded: unknown-word vectors come from a ``torch.Generator`` (seeded index
splits are :func:`bilevel.problems.digits.split_indices`).
"""
from __future__ import annotations

import gzip
import math
import numbers
import os
import re
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "PAD", "UNK", "PAD_INDEX", "UNK_INDEX",
    "tokenize", "Vocabulary", "pad_batch", "load_glove",
]

PAD, UNK = "<pad>", "<unk>"
PAD_INDEX, UNK_INDEX = 0, 1

# A token is either
#   * a "word": a run of Unicode word characters (letters, digits, underscore), where runs joined
#     by a single apostrophe stay one token ("don't", "o'neill", "it's"), or
#   * one single character that is neither a word character nor whitespace (punctuation and
#     symbols: "." "," "!" "?" "-" "@" "#" "(" ... and emoji), each its own token.
# Whitespace only separates tokens. Consequences: "3.14" -> "3" "." "14"; "e-mail" -> "e" "-"
# "mail"; "..." -> "." "." ".".
_TOKEN_RE = re.compile(r"\w+(?:['\u2019]\w+)*|[^\w\s]")


def tokenize(text: str, lowercase: bool = True) -> List[str]:
    """Split ``text`` into words and punctuation marks with a fixed regular expression.

    A token is a run of Unicode word characters (letters, digits, ``_``), possibly joined by
    single apostrophes (``'`` or ``\u2019``; ``"don't"`` stays one token), or else one
    non-space, non-word character (each punctuation mark or symbol is its own token).
    With ``lowercase`` (default) the text is lower-cased with :meth:`str.lower` first.
    The result depends on the text alone (no locale, no state), so it is deterministic.

    >>> tokenize("Don't panic -- it's 3.14!")
    ["don't", 'panic', '-', '-', "it's", '3', '.', '14', '!']
    """
    if not isinstance(text, str):
        raise TypeError(f"tokenize expects a str, got {type(text).__name__}")
    if lowercase:
        text = text.lower()
    return _TOKEN_RE.findall(text)


class Vocabulary:
    """A deterministic token <-> index map with ``<pad>`` = 0 and ``<unk>`` = 1.

    Built from an iterable of token lists. Index 0 is ``<pad>``, index 1 is ``<unk>``, then the
    ``reserved`` tokens (for example ``("<s>", "</s>")``) in the given order, then the regular
    words sorted by decreasing frequency, ties broken alphabetically (by Python string order),
    so the same data always give the same vocabulary whatever the order of the input.

    Args:
        token_lists: iterable of token sequences (for example ``[tokenize(t) for t in texts]``).
        min_freq: keep only words seen at least this many times.
        max_size: keep at most this many *regular* words (the most frequent ones); the special
            and reserved tokens come on top, so ``len(vocab) <= max_size + 2 + len(reserved)``.
            ``None`` keeps all.
        reserved: extra special tokens that are always present, right after ``<unk>``.

    Occurrences of ``<pad>``, ``<unk>`` or a reserved token in the data are not counted as words.
    """

    def __init__(self, token_lists: Iterable[Sequence[str]] = (), min_freq: int = 1,
                 max_size: Optional[int] = None, reserved: Sequence[str] = ()):
        if isinstance(min_freq, bool) or not isinstance(min_freq, numbers.Integral) or min_freq < 1:
            raise ValueError(f"min_freq must be an int >= 1, got {min_freq!r}")
        if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, numbers.Integral)
                                     or max_size < 0):
            raise ValueError(f"max_size must be None or an int >= 0, got {max_size!r}")
        if isinstance(token_lists, str):
            raise TypeError("token_lists must be an iterable of token lists, not a str")
        specials = [PAD, UNK] + [str(t) for t in reserved]
        if len(set(specials)) != len(specials):
            raise ValueError(f"reserved tokens must be distinct and differ from {PAD!r}/{UNK!r}, got {list(reserved)}")
        counts: Counter = Counter()
        for i, tokens in enumerate(token_lists):
            if isinstance(tokens, str):
                raise TypeError(f"token list {i} is a str ({tokens[:30]!r}); pass lists of tokens, "
                                "e.g. tokenize(text)")
            counts.update(tokens)
        for s in specials:
            counts.pop(s, None)
        words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[:int(max_size)]
        self.min_freq = int(min_freq)
        self.max_size = None if max_size is None else int(max_size)
        self.reserved = tuple(specials[2:])
        self._set_itos(specials + words)
        self.counts: Dict[str, int] = {w: counts[w] for w in words}

    def _set_itos(self, itos: List[str]) -> None:
        self.itos: List[str] = list(itos)
        self.stoi: Dict[str, int] = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def from_texts(cls, texts: Iterable[str], lowercase: bool = True, **kwargs) -> "Vocabulary":
        """Build from raw strings, each split with :func:`tokenize`."""
        return cls((tokenize(t, lowercase=lowercase) for t in texts), **kwargs)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token) -> bool:
        return token in self.stoi

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)}, min_freq={self.min_freq}, max_size={self.max_size})"

    def index(self, token: str) -> int:
        """The index of ``token``; ``UNK_INDEX`` (1) if it is not in the vocabulary."""
        return self.stoi.get(token, UNK_INDEX)

    def encode(self, tokens: Sequence[str]) -> List[int]:
        """Indices of ``tokens``; unknown tokens map to ``<unk>`` = 1."""
        if isinstance(tokens, str):
            raise TypeError("encode expects a list of tokens, not a str; use encode(tokenize(text))")
        get = self.stoi.get
        return [get(t, UNK_INDEX) for t in tokens]

    def decode(self, indices: Iterable[int]) -> List[str]:
        """Tokens of ``indices`` (the inverse of :meth:`encode` for known tokens)."""
        return [self.itos[int(i)] for i in indices]

    def to_dict(self) -> dict:
        """A JSON-serialisable description; :meth:`from_dict` rebuilds an equal vocabulary."""
        return {"itos": list(self.itos), "min_freq": self.min_freq, "max_size": self.max_size,
                "reserved": list(self.reserved), "counts": dict(self.counts)}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        """Rebuild a vocabulary saved with :meth:`to_dict` (checks the special tokens)."""
        if not isinstance(d, dict) or "itos" not in d:
            found = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise KeyError(f"a saved Vocabulary needs the key 'itos'; found {found}")
        itos = [str(w) for w in d["itos"]]
        if itos[:2] != [PAD, UNK]:
            raise ValueError(f"a saved Vocabulary must start with {[PAD, UNK]}, got {itos[:2]}")
        if len(set(itos)) != len(itos):
            dup = sorted(w for w, c in Counter(itos).items() if c > 1)
            raise ValueError(f"a saved Vocabulary has duplicate tokens: {dup[:10]}")
        reserved = tuple(d.get("reserved", ()))
        if list(reserved) != itos[2:2 + len(reserved)]:
            raise ValueError(f"reserved tokens {list(reserved)} must follow {PAD!r} and {UNK!r} in 'itos'")
        vocab = cls.__new__(cls)
        vocab.min_freq = int(d.get("min_freq", 1))
        vocab.max_size = None if d.get("max_size") is None else int(d["max_size"])
        vocab.reserved = reserved
        vocab._set_itos(itos)
        vocab.counts = {str(k): int(v) for k, v in d.get("counts", {}).items()}
        return vocab


def pad_batch(sequences: Sequence[Sequence[int]], max_len: Optional[int] = None,
              fixed_length: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pad index sequences with ``<pad>`` = 0 into a (B, L) LongTensor.

    Sequences longer than ``max_len`` are truncated to their first ``max_len`` indices. L is the
    longest (truncated) length in the batch, or exactly ``max_len`` when ``fixed_length`` is set
    (BERT-style ``padding="max_length"``). Returns ``(padded, lengths)`` where ``lengths`` (B,)
    holds the lengths after truncation. Sequences may be lists, numpy arrays or 1-D tensors.
    """
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral)
                                or max_len < 0):
        raise ValueError(f"max_len must be None or an int >= 0, got {max_len!r}")
    if fixed_length and max_len is None:
        raise ValueError("fixed_length=True needs max_len")
    rows = []
    for i, seq in enumerate(sequences):
        if torch.is_tensor(seq):
            t = seq
        elif len(seq) == 0:
            t = torch.zeros(0, dtype=torch.long)
        else:
            t = torch.as_tensor(np.asarray(seq))
        if t.dim() != 1:
            raise ValueError(f"sequence {i} must be one-dimensional, got shape {tuple(t.shape)}")
        if torch.is_floating_point(t) or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"sequence {i} must hold integer indices, got dtype {t.dtype}")
        rows.append(t.long() if max_len is None else t[:max_len].long())
    if not rows:
        raise ValueError("pad_batch needs at least one sequence")
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    width = int(max_len) if fixed_length else int(lengths.max())
    out = torch.full((len(rows), width), PAD_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out, lengths


# -- GloVe ------------------------------------------------------------------------------------

def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def load_glove(path: Union[str, os.PathLike], vocab: Vocabulary, dim: Optional[int] = None,
               generator: Optional[torch.Generator] = None, std: float = 0.1,
               lowercase: bool = False, return_found: bool = False):
    """An embedding matrix (len(vocab), dim) from a user-supplied GloVe text file.

    File format: one word per line followed by ``dim`` floats, separated by single spaces
    (``glove.6B.*``, ``glove.840B.300d.txt``; a ``.gz`` file is read through gzip). A word may
    itself contain spaces (glove.840B has ``". . ."`` or ``"at name@domain.com"``): the last
    ``dim`` fields are the vector and everything before them is the word. ``dim`` defaults to
    the number of fields on the first non-empty line minus one (so that line's word must not
    contain a space; pass ``dim`` otherwise). Blank lines are skipped. Every line's field count
    and first value are checked; the remaining values are parsed for vocabulary words only.

    Rows: a vocabulary word found in the file gets its vector (the first occurrence, if the file
    repeats a word); every other row is drawn from normal(0, ``std``) with ``generator`` (a
    ``torch.Generator``; default: one seeded with 0), and the ``<pad>`` row is zero. The random
    matrix is drawn in one call for all rows before the file's vectors are copied in, so a
    missing word's row does not depend on which other words the file contains.

    With ``lowercase`` the file's words are lower-cased before matching (for a vocabulary built
    from lower-cased text and a cased file such as glove.840B); the first match wins, which is
    the most frequent casing as GloVe files are sorted by frequency.

    Errors: ``FileNotFoundError`` for a missing file; ``ValueError`` naming the file and the line
    number for a line whose vector has a different dimension or a non-numeric value, and for a
    file that shares no word with the vocabulary (``<pad>``/``<unk>`` aside).

    Returns the FloatTensor, or ``(tensor, found)`` with ``return_found``, where ``found`` is a
    BoolTensor (len(vocab),) marking the rows read from the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"GloVe file not found: {path!r}; expected a text file with one word and its "
            "vector per line ('word v1 v2 ... vD', space separated), e.g. glove.6B.100d.txt")
    if not isinstance(vocab, Vocabulary):
        raise TypeError(f"vocab must be a Vocabulary, got {type(vocab).__name__}")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1):
        raise ValueError(f"dim must be None or an int >= 1, got {dim!r}")
    opener = gzip.open if path.endswith(".gz") else open
    vectors: Dict[int, Tuple[int, List[str]]] = {}
    n_lines = 0
    with opener(path, "rt", encoding="utf-8", errors="replace", newline="\n") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n").rstrip(" ")
            if not line.strip():
                continue
            n_lines += 1
            if dim is None:
                dim = len(line.split(" ")) - 1
                if dim < 1:
                    raise ValueError(f"{path}, line {lineno}: expected a word followed by its vector "
                                     f"('word v1 ... vD'), got a single field {line[:60]!r}")
            parts = line.rsplit(" ", dim)
            if len(parts) != dim + 1 or not parts[0]:
                raise ValueError(
                    f"{path}, line {lineno}: expected a word and {dim} values, found "
                    f"{len(line.split(' ')) - 1} values (inconsistent vector dimension)")
            word = parts[0]
            if not _is_float(parts[1]):
                raise ValueError(
                    f"{path}, line {lineno}: expected a word and {dim} numeric values, but the "
                    f"first value is {parts[1][:30]!r} (inconsistent vector dimension or a malformed line)")
            if " " in word:
                # A word with spaces is allowed, but if everything after its first field is
                # numeric the line most likely holds a longer vector than the others.
                head = word.split(" ")
                if all(_is_float(h) for h in head[1:]):
                    raise ValueError(
                        f"{path}, line {lineno}: expected a word and {dim} values, found "
                        f"{dim + len(head) - 1} numeric fields after {head[0]!r} (inconsistent vector dimension)")
            if lowercase:
                word = word.lower()
            idx = vocab.stoi.get(word)
            if idx is None or idx == PAD_INDEX or idx in vectors:
                continue
            vectors[idx] = (lineno, parts[1:])
    if n_lines == 0:
        raise ValueError(f"{path}: the GloVe file is empty; expected lines 'word v1 ... vD'")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    emb = torch.randn(len(vocab), dim, generator=generator, dtype=torch.float32, device=generator.device) * float(std)
    emb[PAD_INDEX] = 0.0
    found = torch.zeros(len(vocab), dtype=torch.bool)
    overlap = 0
    for idx, (lineno, fields) in vectors.items():
        try:
            values = [float(v) for v in fields]
        except ValueError:
            bad = next(v for v in fields if not _is_float(v))
            raise ValueError(f"{path}, line {lineno}: non-numeric vector value {bad[:30]!r} "
                             f"for word {vocab.itos[idx]!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{path}, line {lineno}: non-finite vector value for word {vocab.itos[idx]!r}")
        emb[idx] = torch.tensor(values, dtype=torch.float32)
        found[idx] = True
        if idx != UNK_INDEX:
            overlap += 1
    if overlap == 0:
        sample = vocab.itos[2:7]
        raise ValueError(f"{path}: no word of the vocabulary ({len(vocab)} tokens, e.g. {sample}) "
                         f"appears in the GloVe file ({n_lines} lines); check the file and the casing "
                         "(lowercase=True matches a cased file against a lower-cased vocabulary)")
    return (emb, found) if return_found else emb

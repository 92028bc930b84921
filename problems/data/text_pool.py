"""An offline pool of text documents with provenance, planted noise and held-out splits.

This is the data layer for bilevel data selection in language-model pretraining (BLISS-style
problems: an upper level learns per-document weights of a pretraining pool so that a model
trained on the weighted pool does well on a small validation set). Nothing here trains, tokenizes
for a model or touches the network; the raw files are the pinned sources of
:mod:`bilevel.problems.data.sources`, fetched once with ``bilevel data fetch NAME``.

Sources and readers (each returns a list of :class:`Document`, ordered as in the file):

* ``enwiki-shortened`` -- :func:`read_wikipedia`: one document per main-namespace article of the
  gensim test dump (redirects and empty pages dropped), wikitext turned into plain text by
  :func:`strip_wiki_markup` (our own small stripper, not gensim's);
* ``lee-background`` -- :func:`read_lee`: one document per non-empty line (one news article);
* ``bible-bbe``, ``bible-asv`` -- :func:`read_bible`: one document per chapter, verse numbers
  removed. The pythonbible module is parsed with :mod:`ast`, never imported;
* ``pydoc-topics`` -- :func:`read_pydoc_topics`: one document per topic of the standard library's
  ``pydoc_data.topics`` (no fetch; its text depends on the running Python version).

Planted noise (:func:`plant_noise`): low-quality documents with a ground-truth label ``noise``,
each derived from a clean pool document (``origin``): ``shuffled`` (its tokens permuted),
``random`` (uniform tokens from the pool's vocabulary), ``spam`` (one of its n-grams repeated),
``markup`` (its tokens buried in raw wiki markup). The labels are a ground truth that a data
selection method (e.g. BLISS, "A Lightweight Bilevel Influence Scoring Method for Data Selection
in Language Model Pretraining", arXiv:2510.06048) should learn to down-weight.

Splits (:func:`make_splits`), disjoint by document id:

* ``validation`` -- LAMBADA-style cloze passages (Paperno et al. 2016: predict the final word of
  a passage from its context) cut from held-out Wikipedia articles;
* ``test_in`` -- held-out documents of the in-domain sources (Wikipedia, Lee, BBE Bible);
* ``test_out`` -- every document of the out-of-domain sources, by default ``bible-asv`` (the same
  book in a different, archaic translation: near domain shift) and ``pydoc-topics`` (technical
  Python documentation: far shift); they never enter the pool;
* ``pool`` -- the remaining in-domain documents plus the planted noise.

Every random choice comes from ``numpy.random.default_rng(seed)``: same inputs and seed, same
splits, byte for byte.
"""
from __future__ import annotations

import ast
import bz2
import html
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .fetch import PathLike, _resolve

__all__ = [
    "Document", "Cloze", "TextSplits", "NOISE_KINDS", "IN_DOMAIN", "OUT_OF_DOMAIN",
    "strip_wiki_markup", "read_wikipedia", "read_lee", "read_bible", "read_pydoc_topics",
    "read_all", "plant_noise", "cloze_passages", "make_splits", "load_text_pool",
]

NOISE_KINDS: Tuple[str, ...] = ("shuffled", "random", "spam", "markup")
IN_DOMAIN: Tuple[str, ...] = ("enwiki-shortened", "lee-background", "bible-bbe")
OUT_OF_DOMAIN: Tuple[str, ...] = ("bible-asv", "pydoc-topics")


@dataclass(frozen=True)
class Document:
    """One document with its provenance.

    ``id`` is unique across sources (``"<source>/<key>"``); ``noise`` is ``""`` for a real
    document, else the kind of planted noise (one of :data:`NOISE_KINDS`), and then ``origin`` is
    the id of the clean document it was derived from.
    """

    id: str
    source: str
    title: str
    text: str
    noise: str = ""
    origin: str = ""

    @property
    def is_noise(self) -> bool:
        return bool(self.noise)


@dataclass(frozen=True)
class Cloze:
    """A last-word cloze passage: predict ``target`` (one word) after ``context``."""

    id: str
    doc_id: str
    title: str
    context: str
    target: str


@dataclass
class TextSplits:
    pool: List[Document]
    validation: List[Cloze]
    test_in: List[Document]
    test_out: List[Document]
    out_of_domain: Tuple[str, ...] = field(default=OUT_OF_DOMAIN)


# ---------------------------------------------------------------------------------------------
# Wiki markup

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref\s*>", re.S | re.I)
_BLOCK = re.compile(r"<(math|gallery|timeline|score|syntaxhighlight|pre)\b[^>]*>.*?</\1\s*>",
                    re.S | re.I)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")          # innermost {{...}}
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)  # innermost {| ... |}
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")            # innermost [[...]]
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]*(?:\s+([^\]]*))?\]")
_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$", re.M)
_QUOTES = re.compile(r"'{2,}")
_TAG = re.compile(r"</?[A-Za-z][^>]*>")
_DROP_LINKS = ("file:", "image:", "category:", "media:")


def _sub_until_fixed(pattern: re.Pattern, repl, text: str) -> str:
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _link_text(m: re.Match) -> str:
    inner = m.group(1)
    target, _, rest = inner.partition("|")
    if target.strip().lower().startswith(_DROP_LINKS) or re.match(r"^[a-z-]{2,3}:", target):
        return ""  # images, categories and interlanguage links carry no prose
    return rest.rsplit("|", 1)[-1] if rest else target


def strip_wiki_markup(text: str) -> str:
    """Plain text of MediaWiki wikitext.

    Removes HTML comments, ``<ref>`` footnotes, ``<math>``/``<gallery>``-like blocks, templates ``{{...}}`` (nested), tables
    ``{| ... |}``, file/category/interlanguage links; keeps a link's label (``[[a|b]]`` -> ``b``,
    ``[[a]]`` -> ``a``), an external link's label, a heading's words, and the words inside bold
    and italic quotes; drops other HTML tags, list markers and blank-line runs; unescapes HTML
    entities. Deliberately simple (regular expressions applied innermost-first), not a parser.
    """
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _BLOCK.sub("", text)
    text = _sub_until_fixed(_TEMPLATE, "", text)
    text = _sub_until_fixed(_TABLE, "", text)
    text = _sub_until_fixed(_LINK, _link_text, text)
    text = _EXT_LINK.sub(lambda m: m.group(1) or "", text)
    text = _HEADING.sub(lambda m: m.group(2), text)
    text = _QUOTES.sub("", text)
    text = _TAG.sub("", text)
    text = html.unescape(text)
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^[*#:;]+\s*", "", line.strip())
        line = re.sub(r"[ \t\u00a0]+", " ", line).strip()
        if line:
            lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Readers

def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def read_wikipedia(path: Optional[PathLike] = None, *, min_chars: int = 1) -> List[Document]:
    """Articles (namespace 0, not redirects) of a bz2 MediaWiki XML dump, markup stripped.

    ``path`` defaults to the fetched ``enwiki-shortened`` source. Articles whose plain text is
    shorter than ``min_chars`` are dropped. The id is ``enwiki-shortened/<page id>``.
    """
    file = _resolve("enwiki-shortened", path)
    docs: List[Document] = []
    try:
        with bz2.open(file, "rb") as fh:
            for _, elem in ET.iterparse(fh, events=("end",)):
                if _local(elem.tag) != "page":
                    continue
                fields = {_local(c.tag): c for c in elem}
                title = (fields["title"].text or "") if "title" in fields else ""
                ns = (fields["ns"].text or "").strip() if "ns" in fields else "0"
                page_id = (fields["id"].text or "").strip() if "id" in fields else ""
                text_el = next((c for c in elem.iter() if _local(c.tag) == "text"), None)
                raw = (text_el.text or "") if text_el is not None else ""
                elem.clear()
                if ns != "0" or "redirect" in fields or raw.lstrip().upper().startswith("#REDIRECT"):
                    continue
                plain = strip_wiki_markup(raw)
                if len(plain) >= min_chars:
                    docs.append(Document(f"enwiki-shortened/{page_id}", "enwiki-shortened",
                                         title, plain))
    except (EOFError, OSError, ET.ParseError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"Wikipedia dump {file}: not a valid bz2 MediaWiki XML file "
                         f"({type(exc).__name__}: {exc})") from exc
    return docs


def read_lee(path: Optional[PathLike] = None) -> List[Document]:
    """The Lee background corpus: one document per non-empty line (id ``lee-background/<n>``,
    ``n`` counting documents from 0)."""
    file = _resolve("lee-background", path)
    lines = Path(file).read_text(encoding="utf-8", errors="replace").splitlines()
    docs = [ln.strip() for ln in lines if ln.strip()]
    return [Document(f"lee-background/{i}", "lee-background", f"Lee article {i}", t)
            for i, t in enumerate(docs)]


_VERSE_NUMBER = re.compile(r"^\s*\d+\.\s*")


def _dict_of(node: ast.AST, what: str) -> ast.Dict:
    if not isinstance(node, ast.Dict):
        raise ValueError(f"{what}: expected a dict literal, got {type(node).__name__}")
    return node


def read_bible(source: str = "bible-bbe", path: Optional[PathLike] = None) -> List[Document]:
    """A pythonbible plain-text module, one document per chapter (id ``<source>/<book>.<ch>``).

    The module is the generated ``Bible(version, text, starts, ends, chapters, short_titles,
    long_titles, flag)`` call: ``text`` holds every verse, and ``starts[v]:ends[v]`` slices verse
    ``v = book * 10**6 + chapter * 10**3 + verse`` out of it (with a leading ``"N. "`` verse
    number, removed here). Books are numbered 1.. in the order of ``short_titles``. The file is
    parsed with :mod:`ast` and never executed.
    """
    file = _resolve(source, path)
    what = f"Bible module {file}"
    try:
        tree = ast.parse(Path(file).read_text(encoding="utf-8"))
    except SyntaxError as exc:
        raise ValueError(f"{what}: not valid Python ({exc})") from exc
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Name) and n.func.id == "Bible"]
    if len(calls) != 1 or len(calls[0].args) < 6:
        raise ValueError(f"{what}: expected one Bible(version, text, starts, ends, chapters, "
                         f"titles, ...) call")
    args = calls[0].args
    text = ast.literal_eval(args[1])
    starts = ast.literal_eval(_dict_of(args[2], what))
    ends = ast.literal_eval(_dict_of(args[3], what))
    titles = [v.value for v in _dict_of(args[5], what).values if isinstance(v, ast.Constant)]
    books = sorted({v // 1_000_000 for v in starts})
    if not isinstance(text, str) or len(titles) < len(books) or books != list(
            range(1, len(books) + 1)):
        raise ValueError(f"{what}: verse ids name books {books[:3]}..{books[-3:]} but there are "
                         f"{len(titles)} book titles")
    chapters: Dict[Tuple[int, int], List[str]] = {}
    for v in sorted(starts):
        if v not in ends:
            raise ValueError(f"{what}: verse {v} has a start offset but no end offset")
        verse = _VERSE_NUMBER.sub("", text[starts[v]:ends[v]]).strip()
        chapters.setdefault((v // 1_000_000, v // 1000 % 1000), []).append(verse)
    return [Document(f"{source}/{b}.{c}", source, f"{titles[b - 1]} {c}", " ".join(verses))
            for (b, c), verses in sorted(chapters.items())]


def read_pydoc_topics() -> List[Document]:
    """The help topics of the standard library's ``pydoc_data.topics``, sorted by name."""
    from pydoc_data.topics import topics

    return [Document(f"pydoc-topics/{k}", "pydoc-topics", k, topics[k].strip())
            for k in sorted(topics) if topics[k].strip()]


def read_all(paths: Optional[Dict[str, PathLike]] = None) -> List[Document]:
    """Every source's documents (Wikipedia, Lee, BBE, ASV, pydoc topics). ``paths`` may give an
    explicit file per source name; the others are :func:`~bilevel.problems.data.fetch.locate`-d
    (a missing one raises ``DataNotFoundError`` naming ``bilevel data fetch NAME``)."""
    paths = dict(paths or {})
    unknown = set(paths) - {"enwiki-shortened", "lee-background", "bible-bbe", "bible-asv"}
    if unknown:
        raise ValueError(f"paths: unknown source(s) {sorted(unknown)}; valid: enwiki-shortened, "
                         f"lee-background, bible-bbe, bible-asv")
    return (read_wikipedia(paths.get("enwiki-shortened")) + read_lee(paths.get("lee-background"))
            + read_bible("bible-bbe", paths.get("bible-bbe"))
            + read_bible("bible-asv", paths.get("bible-asv")) + read_pydoc_topics())


# ---------------------------------------------------------------------------------------------
# Planted noise

_MARKUP_PIECES = ("{{cite web|url=http://example.org|title=", "}}", "[[Category:", "]]",
                  "<ref name=\"a\">", "</ref>", "{| class=\"wikitable\"\n|-\n|", "\n|}",
                  "'''", "''", "<!-- ", " -->", "[[File:Image.jpg|thumb|", "== ", " ==")


def _noise_text(kind: str, tokens: List[str], vocab: Sequence[str],
                rng: np.random.Generator) -> str:
    n = len(tokens)
    if kind == "shuffled":
        return " ".join(tokens[i] for i in rng.permutation(n))
    if kind == "random":
        return " ".join(vocab[i] for i in rng.integers(0, len(vocab), size=n))
    if kind == "spam":
        k = int(rng.integers(1, min(4, n) + 1))
        start = int(rng.integers(0, n - k + 1))
        gram = tokens[start:start + k]
        return " ".join((gram * (n // k + 1))[:max(n, 2 * k)])
    if kind == "markup":
        out = []
        for tok in tokens:
            i = 2 * int(rng.integers(0, len(_MARKUP_PIECES) // 2))
            out.append(_MARKUP_PIECES[i] + tok + _MARKUP_PIECES[i + 1])
        return " ".join(out)
    raise ValueError(f"noise kind {kind!r}: must be one of {NOISE_KINDS}")


def plant_noise(docs: Sequence[Document], rate: float, seed: int = 0, *,
                kinds: Sequence[str] = NOISE_KINDS) -> List[Document]:
    """``docs`` plus planted low-quality documents, shuffled together.

    The number planted is ``m = round(rate * n / (1 - rate))`` for ``n`` clean documents, so that
    the noise fraction of the result is ``m / (n + m) ~= rate``. Each planted document takes a
    clean document drawn uniformly (its ``origin``) and a kind drawn uniformly from ``kinds``, and
    keeps that document's token count; ``random`` draws from the sorted vocabulary of ``docs``
    (whitespace tokens). Ids are ``noise/<k>``.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate={rate!r}: the noise rate must be in [0, 1)")
    bad = [k for k in kinds if k not in NOISE_KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds={list(kinds)!r}: each must be one of {NOISE_KINDS}")
    clean = [d for d in docs if d.text.split()]
    if not clean:
        raise ValueError("plant_noise: no document with any token")
    rng = np.random.default_rng(seed)
    m = int(round(rate * len(docs) / (1.0 - rate)))
    vocab = sorted({t for d in clean for t in d.text.split()})
    planted = []
    for k in range(m):
        base = clean[int(rng.integers(0, len(clean)))]
        kind = kinds[int(rng.integers(0, len(kinds)))]
        text = _noise_text(kind, base.text.split(), vocab, rng)
        planted.append(Document(f"noise/{k}", base.source, f"{kind} of {base.title}", text,
                                noise=kind, origin=base.id))
    out = list(docs) + planted
    return [out[i] for i in rng.permutation(len(out))]


# ---------------------------------------------------------------------------------------------
# Cloze passages and splits

_WORD = re.compile(r"[A-Za-z]+")


def cloze_passages(doc: Document, *, words: int = 60, max_passages: int = 3) -> List[Cloze]:
    """Up to ``max_passages`` last-word cloze passages of ``words`` whitespace tokens each, cut
    from consecutive, non-overlapping windows of ``doc``. The target is the window's last token
    with surrounding punctuation removed, kept only if it is an alphabetic word; the context is
    the text before it (LAMBADA's format, Paperno et al. 2016, without its human filtering)."""
    if words < 2:
        raise ValueError(f"words={words!r}: a cloze passage needs at least 2 words")
    toks = doc.text.split()
    out: List[Cloze] = []
    for start in range(0, len(toks) - words + 1, words):
        window = toks[start:start + words]
        target = window[-1].strip(".,;:!?\"'()[]")
        if not _WORD.fullmatch(target):
            continue
        out.append(Cloze(f"{doc.id}#{start}", doc.id, doc.title, " ".join(window[:-1]), target))
        if len(out) == max_passages:
            break
    return out


def make_splits(docs: Sequence[Document], seed: int = 0, *, noise_rate: float = 0.1,
                val_articles: int = 20, test_fraction: float = 0.1,
                out_of_domain: Sequence[str] = OUT_OF_DOMAIN, cloze_words: int = 60,
                cloze_per_article: int = 3, validation_source: str = "enwiki-shortened",
                noise_kinds: Sequence[str] = NOISE_KINDS) -> TextSplits:
    """Split clean ``docs`` by document into pool / validation / in-domain test / OOD test.

    ``val_articles`` articles of ``validation_source`` with at least one cloze passage are held
    out for validation; ``test_fraction`` of each remaining in-domain source (at least one
    document when the source has two or more) is the in-domain test set; sources in
    ``out_of_domain`` go wholly to ``test_out``; the rest, with :func:`plant_noise` at
    ``noise_rate`` (derived from pool documents only), is the pool.
    """
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        raise ValueError("make_splits: document ids are not unique")
    if any(d.is_noise for d in docs):
        raise ValueError("make_splits: expects clean documents; noise is planted here")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r}: must be in [0, 1)")
    ood = tuple(out_of_domain)
    if validation_source in ood:
        raise ValueError(f"validation_source {validation_source!r} is listed as out of domain")
    rng = np.random.default_rng(seed)
    by_source: Dict[str, List[Document]] = {}
    for d in docs:
        by_source.setdefault(d.source, []).append(d)
    test_out = [d for s in sorted(by_source) if s in ood for d in by_source[s]]

    validation: List[Cloze] = []
    val_ids = set()
    wiki = by_source.get(validation_source, [])
    for i in rng.permutation(len(wiki)):
        if len(val_ids) == val_articles:
            break
        passages = cloze_passages(wiki[i], words=cloze_words, max_passages=cloze_per_article)
        if passages:
            validation.extend(passages)
            val_ids.add(wiki[i].id)
    if val_articles > 0 and not validation:
        raise ValueError(f"make_splits: no {validation_source!r} document is long enough for a "
                         f"{cloze_words}-word cloze passage")

    pool: List[Document] = []
    test_in: List[Document] = []
    for s in sorted(by_source):
        if s in ood:
            continue
        rest = [d for d in by_source[s] if d.id not in val_ids]
        n_test = int(round(test_fraction * len(rest)))
        if test_fraction > 0 and len(rest) >= 2:
            n_test = max(n_test, 1)
        order = rng.permutation(len(rest))
        test_in.extend(rest[i] for i in sorted(order[:n_test]))
        pool.extend(rest[i] for i in sorted(order[n_test:]))
    pool = plant_noise(pool, noise_rate, seed=int(rng.integers(0, 2**31 - 1)), kinds=noise_kinds)
    return TextSplits(pool, validation, test_in, test_out, ood)


def load_text_pool(seed: int = 0, *, paths: Optional[Dict[str, PathLike]] = None,
                   **split_options) -> TextSplits:
    """:func:`read_all` then :func:`make_splits` (keyword options pass through)."""
    return make_splits(read_all(paths), seed, **split_options)

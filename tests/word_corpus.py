"""A fixture corpus for the language-model tests: documents of random words from a 20-word
vocabulary, planted spam, a last-word cloze validation set and a word-level tokenizer saved as a
local ``tokenizer.json`` (the user-tokenizer path), so no fetch and no BPE training is needed."""
from __future__ import annotations

import torch

from bilevel.problems.data.text_pool import Cloze, Document, TextSplits

WORDS = tuple("sun moon star sky sea land tree leaf rock sand rain snow wind fire cloud hill lake road bird fish".split())


def words(rng: torch.Generator, n: int) -> str:
    return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=rng))


def splits(rng: torch.Generator, *, pool: int, pool_words: int, noise: int, val: int, val_words: int) -> TextSplits:
    """``pool`` documents of ``pool_words`` random words, ``noise`` spam documents ("fish" repeated),
    ``val`` cloze passages of ``val_words`` words whose target is the i-th word, one in-domain and
    one out-of-domain test document."""
    docs = [Document(f"p/{i}", "p", "P", words(rng, pool_words)) for i in range(pool)]
    docs += [Document(f"noise/{i}", "p", "N", "fish " * pool_words, noise="spam", origin="p/0") for i in range(noise)]
    cloze = [Cloze(f"v/{i}", f"v/{i}", "V", words(rng, val_words), WORDS[i]) for i in range(val)]
    return TextSplits(docs, cloze, [Document("t/0", "p", "T", words(rng, 40))], [Document("o/0", "o", "O", "rock " * 20)])


def tokenizer(directory) -> str:
    """A word-level tokenizer over :data:`WORDS` (id 0: ``<|endoftext|>``), saved in ``directory``."""
    import tokenizers
    vocab = {w: i for i, w in enumerate(("<|endoftext|>",) + WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return str(path)

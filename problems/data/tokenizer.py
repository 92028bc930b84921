"""Tokenizer and fixed-length token sequences for language-model data selection.

Two ways to get a tokenizer, both offline:

* :func:`train_tokenizer`: a byte-level BPE (the GPT-2 / GPT-NeoX scheme: text is mapped to
  bytes, each byte to a printable symbol, then merges are learned; any string is encodable, no
  unknown token) trained with Hugging Face ``tokenizers`` on the texts given. The caller passes
  pool and validation text only, never test text (:func:`training_texts` builds that list from a
  :class:`~bilevel.problems.data.text_pool.TextSplits`). One special token ``<|endoftext|>``
  ends every document and pads sequences. Saved and loaded as ``tokenizer.json``.
* :func:`load_tokenizer`: a user's tokenizer from a local ``tokenizer.json`` file, or a local
  directory readable by ``transformers.AutoTokenizer`` (``local_files_only=True``; never
  downloads).

Sequences (:func:`pack_documents`): each document is encoded, ``<|endoftext|>`` appended, and the
ids cut into consecutive chunks of ``seq_len`` tokens. A chunk never spans two documents, so it
keeps its document's id, source and noise label (the selection metrics need them); a final
chunk shorter than ``min_tokens`` is dropped, shorter ones are right-padded, with ``mask``
marking the real tokens. Right padding needs no attention mask in a causal model: no real token
attends to a later position.

Cloze passages (:func:`pack_cloze`): ``context`` and ``" " + target`` are encoded separately and
concatenated (as lm-evaluation-harness does for LAMBADA), the context truncated from the left to
fit; ``mask`` marks the target's tokens only, so a loss over masked positions is the loss on the
final word.

Everything is deterministic: the BPE trainer breaks ties between equally frequent pairs by the
pair itself, and encoding is a pure function of the text.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EOS = "<|endoftext|>"
#: Vocabulary size of the tiny presets (tests, smoke runs) and of the CPU preset.
DEFAULT_VOCAB_SIZE = 2048

PathLike = Union[str, os.PathLike]


class TextTokenizer:
    """A thin wrapper giving one interface to a ``tokenizers.Tokenizer`` or a ``transformers``
    tokenizer: :meth:`encode` (text -> ids, no special tokens added), :attr:`vocab_size`,
    :attr:`eos_id` (end of document, also the padding id) and :meth:`save`."""

    def __init__(self, backend, eos_id: int, vocab_size: int):
        self.backend, self.eos_id, self.vocab_size = backend, int(eos_id), int(vocab_size)

    def encode(self, text: str) -> List[int]:
        if hasattr(self.backend, "encode_batch"):  # tokenizers.Tokenizer
            return list(self.backend.encode(text, add_special_tokens=False).ids)
        return list(self.backend.encode(text, add_special_tokens=False))

    def encode_many(self, texts: Sequence[str]) -> List[List[int]]:
        if hasattr(self.backend, "encode_batch"):
            return [list(e.ids) for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids))

    def save(self, path: PathLike) -> Path:
        """Write ``tokenizer.json`` (``path`` is the file, or a directory to put it in)."""
        path = Path(path)
        if path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "tokenizer.json"
        if hasattr(self.backend, "encode_batch"):
            self.backend.save(str(path))
        else:
            self.backend.backend_tokenizer.save(str(path))
        return path


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, *,
                    min_frequency: int = 2) -> TextTokenizer:
    """A byte-level BPE with at most ``vocab_size`` tokens (the 256 byte symbols and
    ``<|endoftext|>`` included) trained on ``texts``."""
    if not isinstance(vocab_size, int) or vocab_size < 258:
        raise ValueError(f"vocab_size={vocab_size!r}: a byte-level BPE needs at least 258 tokens "
                         "(256 bytes, <|endoftext|> and one merge)")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tokenizer: no text to train on")
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok, tok.token_to_id(EOS), tok.get_vocab_size())


def load_tokenizer(path: PathLike) -> TextTokenizer:
    """A local tokenizer: a ``tokenizer.json`` file (``tokenizers``), or a directory holding one
    (or any tokenizer ``transformers.AutoTokenizer`` reads with ``local_files_only=True``). The
    end-of-document id is the tokenizer's eos token, else ``<|endoftext|>``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {str(path)!r} does not exist (a tokenizer.json file or a "
                                "local tokenizer directory)")
    if path.is_dir() and (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        path = path / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ValueError(f"tokenizer file {str(path)!r}: not a tokenizers JSON file ({exc})") from exc
        eos = tok.token_to_id(EOS)
        if eos is None:
            raise ValueError(f"tokenizer file {str(path)!r} has no {EOS} token (needed to end documents)")
        return TextTokenizer(tok, eos, tok.get_vocab_size())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.convert_tokens_to_ids(EOS)
    if eos is None or (tok.unk_token_id is not None and eos == tok.unk_token_id and tok.eos_token_id is None):
        raise ValueError(f"tokenizer {str(path)!r} has no eos token and no {EOS} token")
    return TextTokenizer(tok, eos, len(tok))


def training_texts(splits) -> List[str]:
    """The texts a tokenizer may learn from: every pool document and every validation passage
    (context and target word). Test documents never enter."""
    return [d.text for d in splits.pool] + [f"{c.context} {c.target}" for c in splits.validation]


def tokenizer_for(splits, vocab_size: int = DEFAULT_VOCAB_SIZE, path: Optional[PathLike] = None) -> TextTokenizer:
    """``load_tokenizer(path)`` when a path is given, else a BPE trained on ``training_texts``."""
    if path is not None:
        return load_tokenizer(path)
    return train_tokenizer(training_texts(splits), vocab_size)


@dataclass
class Sequences:
    """Fixed-length token sequences with provenance.

    ``tokens`` (N, L) int64, padded with the eos id; ``mask`` (N, L) bool, True on real tokens
    (documents) or on the target word's tokens (cloze); ``doc_ids``, ``sources``, ``noise``
    (``""`` for clean text) per sequence.
    """

    tokens: Tensor
    mask: Tensor
    doc_ids: List[str]
    sources: List[str]
    noise: List[str]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def is_noise(self) -> Tensor:
        return torch.tensor([bool(n) for n in self.noise], dtype=torch.bool)

    def subset(self, index) -> "Sequences":
        idx = torch.as_tensor(index, dtype=torch.long)
        pick = idx.tolist()
        return Sequences(self.tokens[idx], self.mask[idx], [self.doc_ids[i] for i in pick],
                         [self.sources[i] for i in pick], [self.noise[i] for i in pick])


def _check_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r}: a sequence needs at least 2 tokens")


def pack_documents(docs, tokenizer: TextTokenizer, seq_len: int, *, min_tokens: int = 2,
                   max_sequences: Optional[int] = None) -> Sequences:
    """Chunk every document (in order) into sequences of ``seq_len`` tokens, as described in the
    module docstring; at most ``max_sequences`` (the first ones) when given."""
    _check_len(seq_len)
    if not 2 <= min_tokens <= seq_len:
        raise ValueError(f"min_tokens={min_tokens!r}: must lie in [2, seq_len={seq_len}]")
    rows, masks, ids, sources, noise = [], [], [], [], []
    encoded = tokenizer.encode_many([d.text for d in docs])
    for doc, ids_ in zip(docs, encoded):
        ids_ = ids_ + [tokenizer.eos_id]
        for start in range(0, len(ids_), seq_len):
            chunk = ids_[start:start + seq_len]
            if len(chunk) < min_tokens:
                continue
            rows.append(chunk + [tokenizer.eos_id] * (seq_len - len(chunk)))
            masks.append([True] * len(chunk) + [False] * (seq_len - len(chunk)))
            ids.append(doc.id), sources.append(doc.source), noise.append(doc.noise)
            if max_sequences is not None and len(rows) == max_sequences:
                break
        if max_sequences is not None and len(rows) == max_sequences:
            break
    if not rows:
        raise ValueError(f"pack_documents: no document gives a sequence of at least {min_tokens} tokens")
    return Sequences(torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.bool), ids, sources,
                     noise)


def pack_cloze(passages, tokenizer: TextTokenizer, seq_len: int) -> Sequences:
    """One sequence per cloze passage: context tokens then the target word's tokens (mask True on
    the target only), left-truncated to ``seq_len``, right-padded. A passage whose target alone
    does not fit is an error."""
    _check_len(seq_len)
    rows, masks = [], []
    contexts = tokenizer.encode_many([c.context for c in passages])
    targets = tokenizer.encode_many([" " + c.target for c in passages])
    for c, ctx, tgt in zip(passages, contexts, targets):
        if not tgt or len(tgt) >= seq_len:
            raise ValueError(f"cloze passage {c.id!r}: target {c.target!r} is {len(tgt)} tokens; seq_len={seq_len} "
                             "must exceed it")
        ctx = ctx[-(seq_len - len(tgt)):]
        row = ctx + tgt
        rows.append(row + [tokenizer.eos_id] * (seq_len - len(row)))
        masks.append([False] * len(ctx) + [True] * len(tgt) + [False] * (seq_len - len(row)))
    if not rows:
        raise ValueError("pack_cloze: no passage")
    return Sequences(torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.bool),
                     [c.id for c in passages], ["validation"] * len(rows), [""] * len(rows))

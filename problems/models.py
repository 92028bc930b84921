"""Neural networks of the shared problems, used as pure functions of a parameter tree.

A problem's variables are trees (``dict[str, Tensor]``), so every network here is wrapped in a
:class:`FunctionalModel`: ``model.init(generator)`` returns a fresh parameter tree (keys are the
module's ``named_parameters`` names, e.g. ``"encoder.rnn.weight_ih_l0"``) and
``model(params, *inputs)`` runs the module with those parameters through
``torch.func.functional_call``. The module's own parameters are never read or trained.

Building blocks (all deterministic: no dropout):

* :class:`MLP`: ``Linear -> act -> ... -> Linear``, tanh by default (smooth, so second-order
  products are informative; the official heads are ``Linear -> Tanh -> Linear -> Tanh -> Linear``).
* :class:`ConvEncoder`: two stride-2 3x3 convolutions on 28x28 images, then a linear layer.
* :class:`RecurrentEncoder`: learned (or GloVe-initialised) embeddings, an Elman RNN, LSTM or GRU
  (1-2 layers, unidirectional, batch-first), and max-pooling over the *valid* time steps only
  (the official InferSent-style code pools over padding too; here padding never reaches a
  feature).
* :class:`TransformerEncoder`: token + learned position embeddings, pre-LayerNorm blocks of
  multi-head self-attention with a key-padding mask and a tanh feed-forward, mean-pooled over the
  valid tokens. Written with plain tensor operations, so double backward and forward-mode AD
  work on CPU (no fused kernels).
* :class:`PairEncoder`: a sentence-pair encoder for NLI, features ``[u, v, |u - v|, u * v]`` of the
  two sentence encodings (InferSent, Conneau et al. 2017).
* :class:`Classifier`: an encoder followed by an MLP head.

Token inputs are ``(B, L)`` LongTensors right-padded with ``PAD_INDEX`` = 0 (see
:func:`bilevel.problems.data.text.pad_batch`); a pair input is a ``(B, 2, L)`` tensor.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bilevel.tree import Tree

PAD_INDEX = 0
CELLS = ("rnn", "lstm", "gru")
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def autocast_scope(device_type: str, autocast: Optional[torch.dtype]):
    """``torch.autocast(device_type, dtype=autocast)``, or a context that does nothing when
    ``autocast`` is None: where the problems' ``dtype="bfloat16"`` option (see
    :func:`problems.options.check_precision`) puts a network's forward pass under autocast."""
    return contextlib.nullcontext() if autocast is None else torch.autocast(device_type, dtype=autocast)


class FunctionalModel:
    """A module used as a function of an explicit parameter tree.

    Args:
        module: the network; its parameters only give shapes, names and the initialisation.
        dtype: dtype of the parameter trees :meth:`init` returns.
        autocast: None, or a lower precision (``torch.bfloat16``) in which the network runs
            under ``torch.autocast`` on the parameters' device: matrix products, convolutions
            and recurrent cells in bf16, parameters, reductions and the returned output in
            ``dtype`` (the problems' ``dtype="bfloat16"`` option; see
            :func:`problems.options.check_precision`).
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.float32,
                 autocast: Optional[torch.dtype] = None):
        self.module = module.to(dtype)
        self.dtype, self.autocast = dtype, autocast

    def init(self, generator: torch.Generator) -> Tree:
        """Fresh parameters on the generator's device: the module's default initialisation,
        seeded from ``generator`` (same generator state, same parameters) without touching the
        global random state (of the CPU, and of the CUDA device that holds the module)."""
        seed = int(torch.randint(2 ** 62, (1,), generator=generator, device=generator.device))
        held = next(iter(self.module.parameters()), torch.empty(0)).device
        cuda = [held.index if held.index is not None else torch.cuda.current_device()] if held.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(cuda[0]):
                    torch.cuda.manual_seed(seed)
            for layer in self.module.modules():
                if layer is not self.module and hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
            for layer in self.module.modules():  # e.g. GloVe rows of a nested RecurrentEncoder
                if hasattr(layer, "reset_extra"):
                    layer.reset_extra()
        return {name: p.detach().clone().to(generator.device) for name, p in self.module.named_parameters()}

    def __call__(self, params: Tree, *inputs: Tensor) -> Tensor:
        if self.autocast is None:
            return functional_call(self.module, params, inputs)
        device = next(iter(params.values())).device.type
        with autocast_scope(device, self.autocast):
            out = functional_call(self.module, params, inputs)
        return out.to(self.dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


class MLP(nn.Sequential):
    """``Linear(in, h1) -> act -> ... -> Linear(h_k, out)``; no hidden layer gives a linear map."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, activation: str = "tanh"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        sizes = [in_dim, *hidden, out_dim]
        for i, size in enumerate(sizes):
            _check_positive_int(f"MLP layer size {i}", size)
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(ACTIVATIONS[activation]())
        super().__init__(*layers)
        self.out_dim = out_dim


class ConvEncoder(nn.Module):
    """28x28 gray images (B, 784) -> (B, out_dim): conv3x3/2 -> tanh -> conv3x3/2 -> tanh -> linear."""

    def __init__(self, out_dim: int = 64, channels: int = 16, side: int = 28):
        super().__init__()
        _check_positive_int("out_dim", out_dim)
        _check_positive_int("channels", channels)
        self.side = side
        self.conv1 = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        reduced = math.ceil(math.ceil(side / 2) / 2)
        self.linear = nn.Linear(2 * channels * reduced * reduced, out_dim)
        self.out_dim = out_dim

    def forward(self, images: Tensor) -> Tensor:
        h = images.reshape(-1, 1, self.side, self.side)
        h = torch.tanh(self.conv1(h))
        h = torch.tanh(self.conv2(h))
        return self.linear(h.flatten(1))


def valid_mask(tokens: Tensor) -> Tensor:
    """(B, L) bool: True at real tokens. A sequence that is all padding counts its first position
    as valid, so pooling is always over a non-empty set.

    The embeddings have no ``padding_idx``: the ``<pad>`` row is an ordinary parameter. It only
    reaches a feature through an all-padding sequence, and then it is differentiated the same way
    by reverse and forward mode (a ``padding_idx`` row gets zero gradient in reverse mode but a
    tangent in forward mode, so the two HVPs would disagree)."""
    mask = tokens != PAD_INDEX
    first = torch.zeros_like(mask)
    first[:, 0] = ~mask.any(dim=1)  # no branch on the data: nothing is read back to the host
    return mask | first


class RecurrentEncoder(nn.Module):
    """Token ids (B, L) -> (B, hidden): embedding, RNN/LSTM/GRU, max over valid time steps.

    With padding only at the end and a unidirectional network, the outputs at valid positions
    never depend on padding, so no packing is needed.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 64, hidden: int = 64, cell: str = "lstm",
                 layers: int = 1, embeddings: Optional[Tensor] = None):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
        for name, value in (("vocab_size", vocab_size), ("embed_dim", embed_dim), ("hidden", hidden)):
            _check_positive_int(name, value)
        if layers not in (1, 2):
            raise ValueError(f"layers must be 1 or 2, got {layers!r}")
        if embeddings is not None and tuple(embeddings.shape) != (vocab_size, embed_dim):
            raise ValueError(f"embeddings must have shape ({vocab_size}, {embed_dim}), "
                             f"got {tuple(embeddings.shape)}")
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.pretrained = None if embeddings is None else embeddings.detach().clone()
        rnn = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(embed_dim, hidden, num_layers=layers, batch_first=True)
        self.out_dim = hidden

    def reset_extra(self) -> None:
        """Copy the pretrained (GloVe) vectors over the random embedding, when given."""
        if self.pretrained is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(self.pretrained.to(self.embedding.weight.dtype))

    def forward(self, tokens: Tensor) -> Tensor:
        mask = valid_mask(tokens)
        out, _ = self.rnn(self.embedding(tokens))
        return out.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)


class TransformerEncoder(nn.Module):
    """Token ids (B, L) -> (B, dim): a small pre-LN transformer encoder, mean-pooled over valid
    tokens. Block: h <- h + MHA(LN(h)) (padding keys masked out); h <- h + FF(LN(h)), with
    FF = Linear(dim, ff) -> tanh -> Linear(ff, dim)."""

    def __init__(self, vocab_size: int, dim: int = 64, heads: int = 4, layers: int = 2, ff: int = 128,
                 max_len: int = 128):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("dim", dim), ("heads", heads),
                            ("layers", layers), ("ff", ff), ("max_len", max_len)):
            _check_positive_int(name, value)
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads, self.max_len, self.out_dim = heads, max_len, dim
        self.embedding = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(_TransformerBlock(dim, ff) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"sequences of length {tokens.shape[1]} exceed max_len={self.max_len}")
        mask = valid_mask(tokens)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.embedding(tokens) + self.position(positions)
        for block in self.blocks:
            h = block(h, mask, self.heads)
        h = self.norm(h)
        weights = mask.unsqueeze(-1).to(h.dtype)
        return (h * weights).sum(dim=1) / weights.sum(dim=1)


class _TransformerBlock(nn.Module):
    def __init__(self, dim: int, ff: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ff1, self.ff2 = nn.Linear(dim, ff), nn.Linear(ff, dim)

    def forward(self, h: Tensor, mask: Tensor, heads: int) -> Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)             # (B, heads, L, L)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
        h = h + self.out(attended)
        return h + self.ff2(torch.tanh(self.ff1(self.norm2(h))))


class PairEncoder(nn.Module):
    """Sentence pairs (B, 2, L) -> (B, 4 out): [u, v, |u - v|, u * v] with u, v the encodings of
    the premise ``pairs[:, 0]`` and the hypothesis ``pairs[:, 1]`` by one shared encoder."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.out_dim = 4 * encoder.out_dim

    def forward(self, pairs: Tensor) -> Tensor:
        if pairs.dim() != 3 or pairs.shape[1] != 2:
            raise ValueError(f"sentence pairs must have shape (B, 2, L), got {tuple(pairs.shape)}")
        u, v = self.encoder(pairs[:, 0]), self.encoder(pairs[:, 1])
        return torch.cat([u, v, (u - v).abs(), u * v], dim=1)


class Classifier(nn.Module):
    """``head(encoder(inputs))``: logits (B, n_classes)."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.encoder(inputs))


def squared_norm(params: Tree) -> Tensor:
    """sum_k ||params[k]||^2: the strongly convex L2 regulariser of the lower levels."""
    return sum(p.square().sum() for p in params.values())


def cross_entropy(logit: Tensor, labels: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Mean cross-entropy, optionally with per-sample weights (mean of weight_i * CE_i)."""
    if weights is None:
        return F.cross_entropy(logit, labels)
    return (weights * F.cross_entropy(logit, labels, reduction="none")).mean()

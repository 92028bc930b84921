"""Training and evaluating a causal LM on selected sequences (the target of a data-selection round).

:func:`train_lm` is the one LM training loop of the library: the warm-ups of BLISS's proxy and
target on random pool data (``bilevel select``'s and the ``data-selection`` problem's) and the
target's training on a round's selection. Batches of ``batch_size`` sequences drawn uniformly
with replacement from the selected indices (all rows by default; a seeded generator, so every
method draws the same index stream from its own selection), next-token cross-entropy averaged
over the batch's real tokens, AdamW (betas (0.9, 0.95), weight decay 0.1, as BLISS's
``pretrain.py``) at a constant learning rate with the gradient norm clipped to 1. Every
``eval_every`` steps a callback gets the step (the curve of validation loss).

:func:`evaluate_lm` computes the held-out metrics of :mod:`~bilevel.problems.selection_metrics`.
The token budget of a run is ``steps * batch_size * seq_len`` whatever the selection's size.

Under torchrun (:mod:`bilevel.distributed`) :func:`train_lm` is data parallel: every rank draws
the same global batch B (the same seeded generator), computes its slice B_r
(``distributed.shard``) and the loss sum_{tokens of B_r} CE / (tokens of B), whose gradients,
summed over the ranks (``distributed.all_reduce_grads``), are the gradient of the global batch's
mean token CE; clipping and the AdamW step then run identically on every rank's replica. So N
ranks compute the single-process step on B (up to the rounding of a differently ordered sum).
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional

import torch
from torch import Tensor

from bilevel import distributed

from .selection_metrics import cloze_scores, perplexity, token_losses

__all__ = ["batch_loss", "train_lm", "evaluate_lm"]


def batch_loss(logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean next-token CE over the batch's scored tokens (``mask[:, 1:]``)."""
    return token_losses(logits, tokens, mask).sum() / mask[:, 1:].sum().clamp_min(1)


def train_lm(model: torch.nn.Module, tokens: Tensor, mask: Tensor, index: Optional[Tensor], steps: int,
             batch_size: int, lr: float, seed: int = 0, *, generator: Optional[torch.Generator] = None,
             optimizer_state: Optional[dict] = None, on_eval: Optional[Callable[[int], None]] = None,
             eval_every: int = 0, progress: Optional[str] = None) -> dict:
    """``steps`` AdamW steps of ``model`` (in place) on batches drawn from ``tokens[index]``
    (``index=None``: every row).

    The batches are drawn from ``generator`` when given (it advances: a caller can warm up two
    models from one stream), else from a fresh generator seeded ``seed``. ``on_eval(step)`` runs
    after every ``eval_every``-th step (and after the last one). Returns the optimizer's state
    dict (pass it back as ``optimizer_state`` to continue in a later round)."""
    if steps < 0 or batch_size < 1:
        raise ValueError(f"train_lm: steps={steps} must be >= 0 and batch_size={batch_size} >= 1")
    index = torch.arange(tokens.shape[0]) if index is None else torch.as_tensor(index, dtype=torch.long)
    if index.numel() == 0:
        raise ValueError("train_lm: the selection is empty")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
        for group in opt.param_groups:
            group["lr"] = lr
    gen = torch.Generator().manual_seed(int(seed)) if generator is None else generator
    index = index.to(gen.device)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=progress, leave=False, mininterval=1.0)
    model.train()
    for step in range(1, steps + 1):
        pick = index[torch.randint(index.numel(), (batch_size,), generator=gen, device=gen.device)]
        part = distributed.shard(pick)  # under torchrun: this rank's slice of the global batch
        if part is None:
            ids, m = tokens[pick], mask[pick]
            loss = batch_loss(model(input_ids=ids, use_cache=False).logits, ids, m)
        else:  # this rank's share of the global batch's mean token CE: the ranks' gradients sum to its gradient
            ids, m = tokens[part[0]], mask[part[0]]
            loss = token_losses(model(input_ids=ids, use_cache=False).logits, ids, m).sum() / \
                mask[pick][:, 1:].sum().clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if part is not None:
            distributed.all_reduce_grads(model.parameters())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
        if on_eval is not None and eval_every and (step % eval_every == 0 or step == steps):
            model.eval()
            on_eval(step)
            model.train()
    if bar is not None:
        bar.close()
    model.eval()
    return opt.state_dict()


def logits_fn(model: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    return lambda ids: model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, sets: Mapping[str, tuple], batch_size: int = 32) -> Dict[str, float]:
    """Metrics of ``model`` on named evaluation sets: ``sets[name] = ("perplexity", tokens, mask)``
    gives ``ppl_<name>``; ``("cloze", tokens, mask)`` gives ``<name>_loss`` and ``<name>_accuracy``.
    Empty sets are skipped."""
    model.eval()
    out: Dict[str, float] = {}
    fn = logits_fn(model)
    for name, (kind, tokens, mask) in sets.items():
        if tokens is None or tokens.shape[0] == 0:
            continue
        if kind == "perplexity":
            out[f"ppl_{name}"] = perplexity(fn, tokens, mask, batch_size)
        elif kind == "cloze":
            c = cloze_scores(fn, tokens, mask, batch_size)
            out[f"{name}_loss"], out[f"{name}_accuracy"] = c["cloze_loss"], c["cloze_accuracy"]
        else:
            raise ValueError(f"evaluate_lm: set {name!r} has kind {kind!r}; expected 'perplexity' or 'cloze'")
    return out

"""Bilevel data selection for language-model pretraining (BLISS).

Hao et al., "BLISS: A Lightweight Bilevel Influence Scoring Method for Data Selection in Language
Model Pretraining", ICML 2026 (arXiv:2510.06048); official code
MingruiLiu-ML-Lab/BLISS-Bilevel-Data-Selection (``src/select_data/bilevel_selection.py``).

Variables:

    x = the score model S_x: the proxy's GPT-NeoX backbone, mean-pooled over real tokens, then
        Linear(d, 1) and a sigmoid; s_i = S_x(xi_i) in (0, 1), initialised from the warmed-up proxy
    y = every parameter of the proxy language model

Losses, for a lower batch B of pool sequences xi_i and an upper batch of validation cloze
passages:

    P_i(x)   = exp(s_i) / sum_{j in B} exp(s_j)                     (:func:`sample_weights`)
    g(x, y)  = sum_{i in B} P_i(x) CE_i(y) + gamma mean_{i in B} KL_i(T || y) + reg ||y||^2
    f(y)     = mean over passages of the CE of the final word's tokens (LAMBADA-style cloze)

CE_i is the mean next-token cross-entropy over sequence i's tokens; KL_i(T || y) is the
per-position KL divergence from the frozen target LM T to the proxy, summed over the vocabulary
and averaged over positions (:func:`bilevel.problems.language_model.token_kl`). The direction is
BLISS's: its ``F.kl_div(log_softmax(proxy), softmax(target))`` is KL(target || proxy), a
distillation of the proxy toward the target that covers the target's mass (the reverse
direction, mode-seeking, would let the proxy ignore tokens the target finds likely). The KL and
the regulariser do not depend on x, so d2_xy g . z = grad_x sum_i P_i(x) <grad_y CE_i, z>: the
library's generic cross product computes BLISS's per-sample softmax-Jacobian formula in one
backward pass (tests/test_data_selection.py checks the two agree).

f does not depend on x (grad_x f = 0): the hypergradient is -d2_xy g . z with
(d2_yy g + lambda I) z = grad_y f.

Data (``data`` option):

* ``"builtin"`` (the ``tiny`` preset; no fetch): the standard library's ``pydoc_data.topics``
  (in-domain pool, test and validation cloze) and the docstrings of a fixed list of standard
  modules (out-of-domain test), split by :func:`~bilevel.problems.data.text_pool.make_splits`
  with planted noise. Python-version dependent text; a smoke-test corpus, not a benchmark.
* ``"text-pool"`` (the ``cpu`` and ``gpu`` presets): the fetched pool of
  :func:`~bilevel.problems.data.text_pool.load_text_pool` (Wikipedia, Lee news, BBE Bible; OOD
  ASV Bible and pydoc topics).
* ``splits=`` (Python only): a ready :class:`~bilevel.problems.data.text_pool.TextSplits`.

Measured on the tiny preset (seed 0, 384 pool sequences, 32 % of them planted noise by
sequence; before the warm-up moved to the token-mean loss of the shared training loop, not
re-measured since): the warmed-up score model's top 20 % holds 13 % noise; after 60 bliss steps
(upper_lr 1e-3) 53 %: spam (mean score 0.46 -> 0.09) and random tokens are pushed down, but raw
wiki markup rises above clean text (0.52 against 0.31), as does shuffled text. With the Python
documentation as the validation domain, markup's brackets and quotes resemble the code in the
target text: the builtin corpus is a smoke test of the mechanism, not evidence of selection
quality (bliss defaults, upper_lr 1e-4: 21 %).

Precision (``dtype``): float32 (default), float64, or bfloat16: float32 variables with the three
transformers' forward passes under bf16 autocast, the losses, scores and softmax weights in float32
(:mod:`bilevel.problems.language_model`; the ``gpu`` preset's default; tests/test_lm_bf16.py:
the hypergradient within 1% of float32's on the tiny architecture).

A byte-level BPE is trained on pool + validation text (never test), or ``tokenizer_path`` is
loaded. Documents are cut into ``seq_len``-token sequences with provenance
(:mod:`bilevel.problems.data.tokenizer`). The proxy and target are warmed up on uniformly drawn
pool sequences (BLISS's random warm-up) with AdamW when the problem is built
(:func:`~bilevel.problems.selection_train.train_lm`, the loop ``bilevel select`` trains with).
"""
from __future__ import annotations

import copy
import inspect
import importlib
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from bilevel import distributed, sharding
from bilevel.problem import BilevelProblem
from bilevel.registry import register_problem
from bilevel.tree import Tree

from . import language_model as LM
from .batches import IndexBatches, sampling_option
from .cleaning import detection_auc
from .data import text_pool
from .data.text_pool import Document, TextSplits
from .data.tokenizer import Sequences, pack_cloze, pack_documents, tokenizer_for
from .models import squared_norm
from .options import check_choice, check_int, check_precision
from .runs import default_run
from .selection_train import train_lm

NAME = "data-selection"
DATA = ("builtin", "text-pool")
#: Standard-library modules whose docstrings are the builtin data's out-of-domain test source.
BUILTIN_OOD_MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "difflib", "email", "fractions",
                       "functools", "heapq", "itertools", "json", "logging", "pathlib", "pickle", "random",
                       "shutil", "statistics", "string", "textwrap", "typing", "unittest", "zipfile")


def builtin_documents() -> List[Document]:
    """pydoc topics (source ``pydoc-topics``) and module docstrings (source ``stdlib-docstrings``)."""
    docs = text_pool.read_pydoc_topics()
    for name in BUILTIN_OOD_MODULES:
        text = inspect.getdoc(importlib.import_module(name)) or ""
        if text.strip():
            docs.append(Document(f"stdlib-docstrings/{name}", "stdlib-docstrings", name, text.strip()))
    return docs


def sample_weights(scores: Tensor, log_normalizer: Optional[Tensor] = None) -> Tensor:
    """BLISS's per-sample weights P_i = exp(s_i) / sum_j exp(s_j) over the batch (the one place
    they are computed). Under torchrun the sum runs over the whole global batch: the scores of
    every rank's slice are gathered (:func:`bilevel.distributed.gather_batch`, as the official
    code all-gathers them) and this rank's rows of the softmax are returned.
    With ``log_normalizer`` L given, P_i = exp(s_i - L) (the official code's lower steps use the
    previous outer step's L = log sum_j exp(s_j); the weights then need not sum to one)."""
    if log_normalizer is None:
        every, mine = distributed.gather_batch(scores)
        return torch.softmax(every, dim=0)[mine]
    return torch.exp(scores - log_normalizer)


def _load(module: torch.nn.Module, params: Tree) -> None:
    """Copy ``params`` (every parameter of ``module``, by name) into ``module``."""
    names = {k for k, _ in module.named_parameters()}
    if set(params) != names:
        raise ValueError(f"{NAME}: given parameters do not match the model: missing {sorted(names - set(params))[:3]}, "
                         f"unexpected {sorted(set(params) - names)[:3]}")
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(params[name])


def _shuffled(seqs: Sequences, keep: Optional[int], generator: torch.Generator) -> Sequences:
    """The sequences in a seeded random order (index batches need a mixed order; consecutive
    chunks of one document are alike), the first ``keep`` of them when given."""
    order = torch.randperm(len(seqs), generator=generator, device=generator.device).cpu()
    return seqs.subset(order[:keep] if keep is not None else order)


@register_problem(NAME, paper="Hao et al., BLISS: A Lightweight Bilevel Influence Scoring Method for Data "
                  "Selection in Language Model Pretraining, ICML 2026 (arXiv:2510.06048)")
class DataSelection(IndexBatches, BilevelProblem):
    """Score model x weights pool sequences in the proxy y's loss; the proxy's validation cloze
    loss is the upper objective (module docstring).

    Attributes: ``tokenizer``, ``pool`` / ``validation`` / ``test_in`` / ``test_out``
    (:class:`~bilevel.problems.data.tokenizer.Sequences`), ``proxy`` / ``target`` (the
    ``GPTNeoXForCausalLM`` modules, used functionally), ``proxy_params`` / ``target_params``
    (warmed up), ``score`` (the :class:`~bilevel.problems.language_model.ScoreModel` module),
    ``n_train`` (pool sequences), ``n_val`` (cloze passages).
    """

    name = NAME
    headline_metrics = ("val_cloze_loss", "noise_auroc")

    PRESETS: Dict[str, Dict[str, Any]] = {
        # Seconds on 2 CPU cores, no fetched data: 45k-parameter proxy, 238k target, 32 tokens.
        "tiny": dict(data="builtin", model_preset="tiny", noise_rate=0.2, max_pool=384, batch_size=8,
                     val_batch_size=8, val_articles=10, cloze_words=30, warmup_steps=20, warmup_lr=3e-3,
                     eval_pool=128, max_eval=64),
        # The fetched text pool; 0.9M proxy, 5.8M target (bliss.md section 5.2's CPU sizes), 128 tokens.
        "cpu": dict(data="text-pool", model_preset="cpu", noise_rate=0.2, batch_size=16, val_batch_size=8,
                    warmup_steps=500, warmup_lr=1e-3, eval_pool=1024),
        # The paper's setting at CPU scale: the cpu preset (the bilevel study's configuration).
        "paper": dict(data="text-pool", model_preset="cpu", noise_rate=0.2, batch_size=16, val_batch_size=8,
                      warmup_steps=500, warmup_lr=1e-3, eval_pool=1024),
        # One H200: 8.9M proxy, 52M target, 512 tokens, a BLISS-size softmax batch of 32; the LMs
        # under bf16 autocast (mixed precision for the GPU; problem_options.dtype=float32 switches it off).
        "gpu": dict(data="text-pool", model_preset="gpu", noise_rate=0.2, batch_size=32, val_batch_size=8,
                    warmup_steps=2000, warmup_lr=1e-3, eval_pool=4096, dtype="bfloat16"),
    }

    #: ``bilevel run problem=data-selection preset=tiny``: a smoke run of the default solver set
    #: (step sizes for the tiny LMs; the lower steps are SGD on a transformer, hence lr 0.1-0.5).
    RUNS = {
        "tiny": default_run(steps=10, eval_every=5, solver_options={
            "lower-only": dict(lower_lr=0.5),
            "soba": dict(upper_lr=0.05, lower_lr=0.5, z_lr=0.05),
            "stocbio": dict(upper_lr=0.05, lower_lr=0.5, inner_steps=2, neumann_steps=3, neumann_lr=0.05),
            "aid-cg": dict(upper_lr=0.05, lower_lr=0.5, inner_steps=2, cg_steps=3),
            "bo-rep": dict(upper_lr=0.01, lower_lr=0.5, neumann_steps=3, neumann_lr=0.05),
            "slip": dict(upper_lr=0.01, lower_lr=0.5, neumann_steps=3, neumann_lr=0.05)}),
    }

    def __init__(self, data: str = "builtin", model_preset: str = "tiny", vocab_size: Optional[int] = None,
                 seq_len: Optional[int] = None, tokenizer_path: Optional[str] = None,
                 proxy_path: Optional[str] = None, target_path: Optional[str] = None,
                 proxy_arch: Optional[Dict[str, int]] = None, target_arch: Optional[Dict[str, int]] = None,
                 data_paths: Optional[Dict[str, str]] = None, noise_rate: float = 0.2, val_articles: int = 20,
                 cloze_words: int = 60, max_pool: Optional[int] = None, batch_size: int = 8,
                 val_batch_size: int = 8, gamma: float = 1e-2, reg: float = 1e-7, warmup_steps: int = 20,
                 warmup_lr: float = 1e-3, warmup_batch_size: Optional[int] = None, eval_pool: int = 256,
                 max_eval: Optional[int] = None, seed: int = 0, dtype: str = "float32", sampling: str = "blocks",
                 splits: Optional[TextSplits] = None, shard: str = "none", pool: Optional[Sequences] = None,
                 validation: Optional[Sequences] = None, proxy_params: Optional[Tree] = None,
                 target_params: Optional[Tree] = None, score_params: Optional[Tree] = None):
        """
        Args:
            data: "builtin" (standard-library text, no fetch) or "text-pool" (fetched sources);
                ignored when ``splits`` is given.
            model_preset: architecture preset of proxy and target (tiny, cpu, gpu:
                :data:`bilevel.problems.language_model.PRESETS`).
            vocab_size, seq_len: tokenizer vocabulary (BPE training) and sequence length; None:
                the model preset's.
            tokenizer_path: a local tokenizer.json or tokenizer directory instead of training one.
            proxy_arch, target_arch: GPTNeoXConfig fields replacing the preset's (e.g.
                ``{"hidden_size": 64}``).
            proxy_path, target_path: local pretrained weights (from_pretrained, local files only);
                then no warm-up of that model.
            data_paths: explicit files per source for "text-pool".
            noise_rate, val_articles, cloze_words: :func:`~bilevel.problems.data.text_pool.make_splits`.
            max_pool: keep ``max_pool`` pool sequences drawn at random (None: all); every split's
                sequences are stored in a seeded random order.
            batch_size: lower batch (the softmax is over it); val_batch_size: cloze passages per
                upper batch.
            gamma: weight of KL(target || proxy) in g; reg: weight of ||y||^2 in g.
            warmup_steps, warmup_lr, warmup_batch_size: AdamW warm-up of proxy and target on
                random pool sequences (batch default: batch_size).
            eval_pool: pool sequences scored by :meth:`evaluate` for the noise AUROC.
            max_eval: keep ``max_eval`` sequences of each test split, drawn at random (None: all).
            seed: splits, noise, model initialisation and warm-up batches.
            dtype: "float32", "float64", or "bfloat16": float32 variables with proxy, target and
                score model under bf16 autocast (matrix products in bf16; logits and hidden
                states cast to float32 before the losses, the scores and the softmax weights;
                see :mod:`bilevel.problems.language_model`). The warm-up trains in float32.
            sampling: "blocks" or "replacement" (problems/batches.py).
            splits: a TextSplits to use as is (Python API, e.g. tests on fixture text).
            shard: "none", or "fsdp": under torchrun the frozen target LM is sharded with FSDP
                (``fully_shard`` per transformer layer, :func:`bilevel.sharding.shard_module`)
                after its warm-up: each rank stores 1/N of it and gathers it layer by layer in
                the KL term's forward (``target_params`` is then None). The proxy y and the
                score model x stay replicated (:mod:`bilevel.sharding` says why). One process:
                nothing to shard.
            pool, validation: ready Sequences (packed with this tokenizer and ``seq_len``) used as
                the pool and the validation cloze set instead of packing ``splits``' (``bilevel
                select`` passes its own, so that indices are the pipeline's); ``max_pool`` does
                not apply to a given pool.
            proxy_params, target_params: start from these parameters (e.g. a pipeline's warm-up
                checkpoint, its current target) instead of a warm-up; score_params: the x0 of
                :meth:`init` (e.g. a score model kept from an earlier round) instead of one
                initialised from the proxy.
        """
        check_choice(NAME, "data", data, DATA)
        check_choice(NAME, "model_preset", model_preset, tuple(LM.PRESETS))
        for option, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size),
                              ("eval_pool", eval_pool), ("val_articles", val_articles),
                              ("cloze_words", cloze_words)):
            check_int(NAME, option, value)
        check_int(NAME, "warmup_steps", warmup_steps, minimum=0)
        check_int(NAME, "seed", seed, minimum=0)
        check_int(NAME, "max_pool", max_pool, allow_none=True)
        check_int(NAME, "max_eval", max_eval, allow_none=True)
        for option, value in (("gamma", gamma), ("reg", reg)):
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{NAME}: {option}={value!r} must be a number >= 0")
        if not 0 <= noise_rate < 1:
            raise ValueError(f"{NAME}: noise_rate={noise_rate!r} must lie in [0, 1)")
        self.shard = sharding.check_shard(NAME, shard)
        self.dtype, self.autocast = check_precision(NAME, dtype)
        self.sampling = sampling_option(NAME, sampling)
        self.gamma, self.reg, self.seed = float(gamma), float(reg), int(seed)
        self.batch_size, self.val_batch_size, self.eval_pool = int(batch_size), int(val_batch_size), int(eval_pool)
        spec = LM.PRESETS[model_preset]
        self.seq_len = int(seq_len or spec["seq_len"])

        if splits is None:
            options = dict(noise_rate=noise_rate, val_articles=val_articles, cloze_words=cloze_words)
            if data == "builtin":
                splits = text_pool.make_splits(builtin_documents(), seed, validation_source="pydoc-topics",
                                               out_of_domain=("stdlib-docstrings",), **options)
            else:
                splits = text_pool.load_text_pool(seed, paths=data_paths, **options)
        self.splits = splits
        self.tokenizer = tokenizer_for(splits, int(vocab_size or spec["vocab_size"]), tokenizer_path)
        shuffle = torch.Generator().manual_seed(seed)
        self.pool = (_shuffled(pack_documents(splits.pool, self.tokenizer, self.seq_len), max_pool, shuffle)
                     if pool is None else pool)
        self.validation = pack_cloze(splits.validation, self.tokenizer, self.seq_len) if validation is None else validation
        self.test_in = _shuffled(pack_documents(splits.test_in, self.tokenizer, self.seq_len), max_eval, shuffle)
        self.test_out = (_shuffled(pack_documents(splits.test_out, self.tokenizer, self.seq_len), max_eval, shuffle)
                         if splits.test_out else None)
        self.n_train, self.n_val = len(self.pool), len(self.validation)

        vocab = self.tokenizer.vocab_size
        proxy_config = LM.lm_config(model_preset, "proxy", vocab, self.seq_len, **dict(proxy_arch or {}))
        target_config = LM.lm_config(model_preset, "target", vocab, self.seq_len, **dict(target_arch or {}))
        self.proxy = LM.build_lm(proxy_config, path=proxy_path, seed=seed, dtype=self.dtype)
        self.target = LM.build_lm(target_config, path=target_path, seed=seed + 1, dtype=self.dtype)
        self.score = LM.ScoreModel(self.proxy.config).to(self.dtype)
        # the warm-up: the library's one LM training loop (bilevel select's), in place on the
        # modules, both models drawing their batches from one seeded stream
        generator = torch.Generator().manual_seed(seed)
        steps, lr, batch = int(warmup_steps), float(warmup_lr), int(warmup_batch_size or batch_size)
        for path, given, module in ((proxy_path, proxy_params, self.proxy), (target_path, target_params, self.target)):
            if given is not None:
                _load(module, given)
            elif path is None:
                train_lm(module, self.pool.tokens, self.pool.mask, None, steps, batch, lr, generator=generator)
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.proxy_params = LM.params_of(self.proxy)
        self.target_params = LM.params_of(self.target)
        self.score_params = None if score_params is None else {k: v.detach().clone() for k, v in score_params.items()}
        if self.shard == "fsdp":
            self._shard_target()
        self.log_normalizer: Optional[Tensor] = None

    def _shard_target(self) -> None:
        """The target module holds the warmed-up ``target_params``, then is sharded with FSDP
        (under torchrun; when no process group exists yet, it is initialised from torchrun's
        environment with gloo: the problem is built on the CPU; ``bilevel run`` initialises it
        earlier, for its device)."""
        distributed.setup("cpu")
        if not distributed.active():
            return
        with torch.no_grad():
            for name, p in self.target.named_parameters():
                p.copy_(self.target_params[name])
        self.target = sharding.shard_module(self.target, self.target.gpt_neox.layers)
        self.target_params = None  # the sharded module holds them

    def target_logits(self, tokens: Tensor) -> Tensor:
        """The frozen target's logits (no graph): the module itself when FSDP-sharded (it gathers
        its layers), else ``functional_call`` with ``target_params``."""
        with torch.no_grad():
            if sharding.is_sharded(self.target):
                return LM.module_logits(lambda: self.target(input_ids=tokens, use_cache=False),
                                        tokens.device.type, self.autocast)
            return LM.lm_logits(self.target, self.target_params, tokens, self.autocast)

    # -- weights, losses -------------------------------------------------------------------------

    def with_log_normalizer(self, log_normalizer: Optional[Tensor]) -> "DataSelection":
        """A shallow copy whose lower loss uses P_i = exp(s_i - log_normalizer) (the official
        code's previous-denominator weights; see :func:`sample_weights`). Shares every tensor."""
        view = copy.copy(self)
        view.log_normalizer = None if log_normalizer is None else log_normalizer.detach()
        return view

    def scores(self, x: Tree, tokens: Tensor, mask: Tensor) -> Tensor:
        """(N,) sigmoid scores s_i of sequences under the score model x."""
        return LM.scores(self.score, x, tokens, mask, self.autocast)

    def batch_scores(self, x: Tree, batch: Optional[Tensor]) -> Tensor:
        """(B,) scores s_i of the pool sequences of a lower batch."""
        tokens, mask = self._rows(self.pool, batch)
        return self.scores(x, tokens, mask)

    def weights(self, x: Tree, batch: Optional[Tensor]) -> Tensor:
        """P(x) over the lower batch (:func:`sample_weights`)."""
        return sample_weights(self.batch_scores(x, batch), self.log_normalizer)

    def _rows(self, seqs: Sequences, batch: Optional[Tensor]):
        if batch is None:
            return seqs.tokens, seqs.mask
        return seqs.tokens[batch], seqs.mask[batch]

    def lower_terms(self, x: Tree, y: Tree, batch: Optional[Tensor]):
        """(P, CE, KL): weights, per-sequence CE_i(y) and KL_i(T || y) on the lower batch."""
        tokens, mask = self._rows(self.pool, batch)
        logits = LM.lm_logits(self.proxy, y, tokens, self.autocast)
        ce = LM.sequence_ce_from_logits(logits, tokens, mask)
        if self.gamma:
            kl = LM.token_kl(logits, self.target_logits(tokens), mask)
        else:
            kl = torch.zeros_like(ce)
        weights = sample_weights(self.scores(x, tokens, mask), self.log_normalizer)  # float32
        return weights, ce, kl

    def lower_loss(self, x: Tree, y: Tree, batch: Optional[Tensor]) -> Tensor:
        """sum_i P_i CE_i + gamma mean_i KL_i(T || y) + reg ||y||^2 on the lower batch."""
        weights, ce, kl = self.lower_terms(x, y, batch)
        # a sum over the batch: divided by this rank's share of it under torchrun (slice_weight)
        loss = (weights * ce).sum() / distributed.slice_weight() + self.gamma * kl.mean()
        return loss + self.reg * squared_norm(y) if self.reg else loss

    def upper_loss(self, x: Tree, y: Tree, batch: Optional[Tensor]) -> Tensor:
        """Mean final-word CE of the proxy on the cloze passages of the upper batch; independent of x."""
        tokens, mask = self._rows(self.validation, batch)
        return LM.sequence_ce(self.proxy, y, tokens, mask, self.autocast).mean()

    def init(self, generator: torch.Generator):
        """x0: the score model from the warmed-up proxy (head drawn from ``generator``), or the
        given ``score_params``; y0: the warmed-up (or given) proxy."""
        if self.score_params is not None:
            x0 = {k: v.clone() for k, v in self.score_params.items()}
        else:
            x0 = LM.score_params_from_lm(self.score, self.proxy_params, generator)
        return x0, {k: v.clone() for k, v in self.proxy_params.items()}

    # -- metrics --------------------------------------------------------------------------------

    def token_losses(self, params: Tree, seqs: Sequences, model=None, chunk: int = 64):
        """(summed token CE, token count, exact-match count) of ``model`` (default the proxy)
        over every sequence; exact match: all scored tokens of a sequence are the argmax."""
        model = self.proxy if model is None else model
        total, count, exact = 0.0, 0, 0
        with torch.no_grad():
            for start in range(0, len(seqs), chunk):
                tokens, mask = seqs.tokens[start:start + chunk], seqs.mask[start:start + chunk]
                logits = LM.lm_logits(model, params, tokens, self.autocast)
                ce = LM.sequence_ce_from_logits(logits, tokens, mask)
                n = mask[:, 1:].sum(1)
                total += float((ce * n).sum())
                count += int(n.sum())
                hit = (logits[:, :-1].argmax(-1) == tokens[:, 1:]) | ~mask[:, 1:]
                exact += int(hit.all(1).sum())
        return total, count, exact

    def evaluate(self, x: Tree, y: Tree) -> Dict[str, float]:
        """Proxy metrics: ``val_cloze_loss`` (mean final-word CE per token), ``val_cloze_accuracy``
        (final word greedily predicted), ``test_in_ppl`` / ``test_out_ppl`` (token perplexity),
        and, on the first ``eval_pool`` pool sequences, ``noise_auroc`` (ROC AUC of the scores
        for clean against planted noise; 0.5 chance, 1 every clean sequence scores higher)."""
        y = {k: v.detach() for k, v in y.items()}
        total, count, exact = self.token_losses(y, self.validation)
        out = {"val_cloze_loss": total / count, "val_cloze_accuracy": exact / len(self.validation)}
        total, count, _ = self.token_losses(y, self.test_in)
        out["test_in_ppl"] = float(torch.tensor(total / count).exp())
        if self.test_out is not None:
            total, count, _ = self.token_losses(y, self.test_out)
            out["test_out_ppl"] = float(torch.tensor(total / count).exp())
        n = min(self.eval_pool, len(self.pool))
        with torch.no_grad():
            s = torch.cat([self.scores({k: v.detach() for k, v in x.items()}, t, m)
                           for t, m in zip(self.pool.tokens[:n].split(64), self.pool.mask[:n].split(64))])
        s, noise = s.cpu(), self.pool.is_noise[:n]
        out["noise_auroc"] = detection_auc(s, noise)
        out["score_std"] = float(s.std()) if n > 1 else 0.0
        return out

"""One BLISS round for ``bilevel select``: the bilevel phase, then scoring the pool.

BLISS (Hao et al., ICML 2026, arXiv:2510.06048), section "rounds" of its ``scripts/run.sh``: with
the target LM frozen, the ``bliss`` solver runs ``bilevel_steps`` outer steps on the
``data-selection`` problem (x = score model initialised from the proxy, y = the proxy; the KL term
pulls the proxy toward the *current* target), then the learned score model scores every pool
sequence. Everything goes through :func:`bilevel.solve`, the same estimators and oracles as any
other solver.

The problem is built each round from the pipeline's own splits, tokenizer, pool and validation
sequences (so that indices are the pipeline's), with the round's proxy and target as its starting
parameters (no warm-up) and the round's score model as x0. Every round's bilevel phase starts from the warm-up proxy, as in the official code
(its ``setup()`` reloads the proxy's warm-up checkpoint each round; the lines that would carry the
proxy over are commented out). ``carry_proxy`` (an ablation) instead writes the proxy the phase
ends with into the pipeline's proxy module, so that the next round starts from it: measured on the
tiny preset (``experiments/bliss_rounds.py``, experiments/README.md), that carried proxy is what
made round 2 relapse (noise kept at 1.41x and 2.32x its base rate at seeds 1 and 2, against 0.61x
and 0.76x from the warm-up proxy with everything else equal). The score model is fresh from the
round's starting proxy in round 1 only: by default (``keep_score_model``, as the official code,
whose rounds >= 2 load the previous round's score-model checkpoint) round r >= 2 starts from the
score model round r - 1 ended with; ``keep_score_model=false`` (an ablation) re-initialises it from
the round's starting proxy (backbone copied, a fresh head) every round.
"""
from __future__ import annotations

import numpy as np
import torch

from .selection_methods import RoundInputs, score_with

__all__ = ["bliss_round", "build_problem"]


def build_problem(inputs: RoundInputs, score_params=None):
    """The round's ``data-selection`` problem, built with the pipeline's data and models: its
    pool and validation sequences (so that indices are the pipeline's), the round's proxy and
    target as the starting parameters (no warm-up), and ``score_params`` as x0 when given."""
    from .data_selection import DataSelection
    o = inputs.options
    p_opts = dict(o.get("problem_options") or {})
    unknown = set(p_opts) - {"gamma", "reg", "batch_size", "val_batch_size", "sampling", "dtype"}
    if unknown:
        raise ValueError(f"problem_options {sorted(unknown)}: bilevel select passes only gamma, reg, batch_size, "
                         "val_batch_size, sampling and dtype (bfloat16: the bilevel phase under bf16 autocast) to "
                         "the data-selection problem (the data and models are the pipeline's)")
    p_opts.setdefault("batch_size", int(o.get("batch_size", 8)))
    data = o["_data"]
    return DataSelection(splits=data.splits, tokenizer_path=str(data.tokenizer_path), model_preset=o["preset"],
                         seq_len=int(inputs.pool.tokens.shape[1]), warmup_steps=0,
                         eval_pool=min(256, len(inputs.pool)), max_eval=o.get("max_eval_sequences"), seed=inputs.seed,
                         pool=inputs.pool, validation=inputs.validation, proxy_params=_params(inputs.proxy),
                         target_params=_params(inputs.target), score_params=score_params, **p_opts)


def _params(module: torch.nn.Module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def bliss_round(inputs: RoundInputs) -> np.ndarray:
    """Run the bilevel phase of round ``inputs.round`` and return the pool's scores."""
    from bilevel.solve import solve
    from .selection_methods import _fresh_score_model
    o = inputs.options
    keep = bool(o.get("keep_score_model", True))  # the official code's behaviour; False: an ablation
    x0 = inputs.state.get("score") if keep else None
    if x0 is None:  # round 1, or the ablation: fresh from the round's starting proxy, the head drawn from the round's seed
        _, x0 = _fresh_score_model(inputs, 1000 * inputs.seed + inputs.round)
    problem = build_problem(inputs, x0)
    steps = int(o.get("bilevel_steps", 20))
    solver_options = {"total_steps": max(1, steps), **dict(o.get("solver_options") or {})}
    every = int(o.get("bilevel_eval_every") or steps)  # the upper-loss curve of the phase (diagnostics)
    result = solve(problem, "bliss", steps=steps, seed=1000 * inputs.seed + inputs.round, eval_every=max(1, every),
                   progress=bool(o.get("progress")), initial_eval=every < steps, **solver_options)
    if o.get("carry_proxy"):  # an ablation: the official code restarts every round from the warm-up proxy
        with torch.no_grad():
            for name, p in inputs.proxy.named_parameters():
                p.copy_(result.y[name])
    x = {k: v.detach() for k, v in result.x.items()}
    if keep:
        inputs.state["score"] = {k: v.clone() for k, v in x.items()}
    inputs.state.setdefault("bilevel", []).append({"round": inputs.round, **{
        k: v for k, v in result.final.items() if isinstance(v, (int, float))}})
    if every < steps:
        inputs.state["bilevel"][-1]["curve"] = [
            {k: r[k] for k in ("iteration", "val_cloze_loss", "noise_auroc") if k in r} for r in result.history]
    return score_with(problem.score, x, inputs.pool.tokens, inputs.pool.mask)

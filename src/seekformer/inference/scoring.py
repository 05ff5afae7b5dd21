"""Scoring helpers for evaluation: log-likelihood of a continuation, per-token logprobs.

    total, greedy = loglikelihood(model, context_ids, continuation_ids)

`total` is sum_i log p(cont_i | context, cont_<i) and `greedy` says whether every continuation token is
the argmax at its position (lm-evaluation-harness' `loglikelihood` contract). Batched scoring right-pads
the sequences of a batch (one forward, no cache); sequences longer than the model context keep their
last `max_position_embeddings` tokens (the continuation must fit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import GenerationError


def _fit(model, context: Sequence[int], continuation: Sequence[int]) -> tuple[list[int], int]:
    """Concatenate and left-truncate to the context window; returns (ids, number of continuation tokens)."""
    ctx, cont = [int(i) for i in context], [int(i) for i in continuation]
    if not cont:
        raise GenerationError("loglikelihood needs a non-empty continuation")
    if not ctx:
        bos = model.config.bos_token_id if model.config.bos_token_id is not None else model.config.eos_token_id
        if bos is None:
            raise GenerationError("empty context and the model has no bos/eos token to start from")
        ctx = [int(bos)]
    limit = model.config.max_position_embeddings
    if len(cont) >= limit:
        raise GenerationError(f"continuation ({len(cont)} tokens) does not fit the model context ({limit})")
    ids = (ctx + cont)[-limit:]
    return ids, len(cont)


@torch.no_grad()
def loglikelihood_batch(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                        batch_size: int = 8) -> list[tuple[float, bool]]:
    """[(context_ids, continuation_ids), ...] -> [(sum logprob, is_greedy), ...] in input order."""
    items = [_fit(model, c, x) for c, x in requests]
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))  # similar lengths share a batch
    out: list[tuple[float, bool]] = [(0.0, False)] * len(items)
    was_training = model.training
    model.eval()
    pad = model.config.pad_token_id or 0
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            t = max(len(items[i][0]) for i in idx)
            ids = torch.full((len(idx), t), pad, dtype=torch.long)
            am = torch.zeros(len(idx), t, dtype=torch.long)
            for r, i in enumerate(idx):
                seq = items[i][0]
                ids[r, : len(seq)] = torch.tensor(seq)
                am[r, : len(seq)] = 1
            ids, am = ids.to(model.device), am.to(model.device)
            logp = model(ids, am if not bool(am.all()) else None).logits.float().log_softmax(-1)
            for r, i in enumerate(idx):
                seq, n = items[i]
                lo = len(seq) - n
                target = ids[r, lo:len(seq)]
                lp = logp[r, lo - 1:len(seq) - 1]  # position j predicts token j+1
                total = float(lp.gather(1, target[:, None]).sum())
                out[i] = (total, bool((lp.argmax(-1) == target).all()))
    finally:
        model.train(was_training)
    return out


def loglikelihood(model, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> tuple[float, bool]:
    """(sum of the continuation's logprobs given the context, whether it is the greedy continuation)."""
    return loglikelihood_batch(model, [(context_ids, continuation_ids)])[0]


@torch.no_grad()
def prompt_logprobs(model, ids: Sequence[int], top_n: int = 0) -> list[dict]:
    """Per token of `ids`: {"token": id, "logprob": log p(token | previous) (None for the first),
    "top": [(id, logprob), ...] (top_n alternatives)}; the `echo` + `logprobs` of a completions API."""
    seq = [int(i) for i in ids]
    if not seq:
        raise GenerationError("empty prompt: give at least one token")
    if len(seq) > model.config.max_position_embeddings:
        raise GenerationError(f"prompt is {len(seq)} tokens but the model context is "
                              f"{model.config.max_position_embeddings}")
    was_training = model.training
    model.eval()
    try:
        x = torch.tensor([seq], device=model.device)
        logp = model(x).logits[0].float().log_softmax(-1)  # [T,V]
    finally:
        model.train(was_training)
    out = [{"token": seq[0], "logprob": None, "top": []}]
    for j in range(1, len(seq)):
        row = logp[j - 1]
        top = list(zip(*[v.tolist() for v in row.topk(top_n)][::-1])) if top_n else []
        out.append({"token": seq[j], "logprob": float(row[seq[j]]), "top": top})
    return out

"""Prompt work the decode thread does between engine steps: scoring prompts (echo + logprobs) and
embeddings, in bounded rounds with a fair share per request.

    work = PromptWork(model, chunk_tokens=512)
    work.add(PromptJob(sub, choice, ids, "score", top_n=5))
    for job, result in work.run_round():   # result: TokenScores | embedding [D] | an exception
        ...

A round spends about `chunk_tokens` prompt tokens. Requests take turns (one job each, round-robin, until
the budget is spent), so a request with 200 prompts cannot hold up a request with one. A prompt that fits
the rest of the budget is done whole (such prompts are batched in one forward, right-padded); a longer one
is encoded `chunk_tokens` at a time through its own one-row KV cache, over as many rounds as it needs.
The decode thread runs one engine step after every round, so running streams keep decoding meanwhile.

Shapes: L prompt tokens, k top alternatives, D hidden size.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ..inference.scoring import TokenScores, score_tokens

KINDS = ("score", "embed")


@dataclass
class PromptJob:
    """One prompt of one request: `kind` "score" (TokenScores with `top_n` alternatives) or "embed"
    (`pooling` "mean" or "last" over the final hidden states)."""

    sub: Any  # the request's Submission (only its identity and `cancelled` are used here)
    choice: int
    ids: list[int]
    kind: str = "score"
    top_n: int = 1
    pooling: str = "mean"
    pos: int = 0  # tokens encoded so far (chunked jobs)
    cache: Any = None
    parts: list = field(default_factory=list)  # score chunks: (logprobs, greedy, top_ids, top_logprobs)
    hidden_sum: torch.Tensor | None = None  # [D] running sum (mean pooling)
    last: torch.Tensor | None = None  # [D] hidden state of the last token seen


class PromptWork:
    """The queue of prompt jobs, per request, and the rounds that work through it (see the module doc)."""

    def __init__(self, model, chunk_tokens: int = 512) -> None:
        self.model = model
        self.chunk = max(2, int(chunk_tokens))
        self._queues: OrderedDict[int, deque[PromptJob]] = OrderedDict()  # request -> its jobs, in turn order
        self.tokens_done = 0  # prompt tokens encoded so far (for memory housekeeping)

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def add(self, job: PromptJob) -> None:
        """Queue `job` behind the earlier jobs of the same request (requests take turns)."""
        self._queues.setdefault(id(job.sub), deque()).append(job)

    def drop_cancelled(self) -> list[PromptJob]:
        """Remove and return the jobs of cancelled requests."""
        out = []
        for key in [k for k, q in self._queues.items() if q and q[0].sub.cancelled]:
            out += list(self._queues.pop(key))
        return out

    def run_round(self) -> list[tuple[PromptJob, Any]]:
        """About `chunk_tokens` tokens of work, requests in turn; returns the (job, result or exception) of
        every job that finished in this round."""
        budget, finished, whole = self.chunk, [], []
        with torch.inference_mode():
            while budget > 0 and self._queues:
                key, queue = next(iter(self._queues.items()))
                job = queue[0]
                rest = len(job.ids) - job.pos
                if min(rest, self.chunk) > budget:
                    break  # no room for this job's next chunk in this round: it goes first next round
                self._queues.move_to_end(key)  # the next request's turn
                if job.pos == 0 and rest <= budget:  # whole, batched below
                    queue.popleft()
                    whole.append(job)
                    budget -= rest
                else:
                    try:
                        done = self._chunk(job, min(rest, self.chunk))
                    except Exception as e:  # noqa: BLE001 - this job fails alone
                        done, job.cache = e, None
                    budget -= min(rest, self.chunk)
                    if done is not None:
                        queue.popleft()
                        finished.append((job, done))
                if not queue:
                    del self._queues[key]
            for kind in KINDS:
                jobs = [j for j in whole if j.kind == kind]
                if jobs:
                    finished += self._whole(jobs)
        self.tokens_done += self.chunk - budget
        return finished

    # ------------------------------------------------------------------ whole prompts, batched
    def _whole(self, jobs: list[PromptJob]) -> list[tuple[PromptJob, Any]]:
        try:
            return list(zip(jobs, self._batch(jobs)))
        except Exception:  # noqa: BLE001 - one bad prompt must not fail the others: retry one by one
            if len(jobs) == 1:
                raise
        out = []
        for job in jobs:
            try:
                out.append((job, self._batch([job])[0]))
            except Exception as e:  # noqa: BLE001
                out.append((job, e))
        return out

    def _batch(self, jobs: list[PromptJob]) -> list[Any]:
        if jobs[0].kind == "score":
            scores = score_tokens(self.model, [j.ids for j in jobs], top_n=max(1, max(j.top_n for j in jobs)))
            return scores
        t = max(len(j.ids) for j in jobs)
        ids = torch.zeros(len(jobs), t, dtype=torch.long)
        mask = torch.zeros(len(jobs), t, dtype=torch.long)
        for r, j in enumerate(jobs):  # right padding: causal attention never lets real tokens see pads
            ids[r, : len(j.ids)] = torch.as_tensor(j.ids, dtype=torch.long)
            mask[r, : len(j.ids)] = 1
        dev = self.model.device
        hidden = self.model(ids.to(dev), mask.to(dev), logits_to_keep=1, return_hidden=True).hidden_states.float()
        out = []
        for r, j in enumerate(jobs):
            h = hidden[r, : len(j.ids)]  # [L,D]
            out.append((h.mean(0) if j.pooling == "mean" else h[-1]).cpu())
        return out

    # ------------------------------------------------------------------ long prompts, chunk by chunk
    def _chunk(self, job: PromptJob, size: int) -> Any:
        """Encode tokens [pos, pos+size) through the job's cache; returns its result after the last chunk."""
        from ..inference.decoding import new_cache

        if job.cache is None:
            job.cache = new_cache(self.model, 1, len(job.ids))
        lo, hi = job.pos, job.pos + size
        ids = torch.tensor([job.ids[lo:hi]], device=self.model.device)
        if job.kind == "embed":
            h = self.model(ids, cache=job.cache, logits_to_keep=1, return_hidden=True).hidden_states[0].float()
            job.hidden_sum = h.sum(0) if job.hidden_sum is None else job.hidden_sum + h.sum(0)
            job.last = h[-1]
        else:
            logp = self.model(ids, cache=job.cache).logits[0].float().log_softmax(-1)  # [size,V]
            target = torch.tensor(job.ids[lo + 1:hi + 1], device=logp.device)  # the last chunk has one fewer
            logp = logp[: len(target)]
            top_v, top_i = logp.topk(min(max(1, job.top_n), logp.shape[-1]), dim=-1)
            job.parts.append((logp.gather(-1, target[:, None]).squeeze(-1).double().cpu(),
                              (logp.argmax(-1) == target).cpu(), top_i.cpu(), top_v.double().cpu()))
        job.pos = hi
        if hi < len(job.ids):
            return None
        job.cache = None
        if job.kind == "embed":
            return (job.hidden_sum / len(job.ids) if job.pooling == "mean" else job.last).cpu()
        cols = list(zip(*job.parts))
        job.parts = []
        return TokenScores(*(torch.cat(c) for c in cols))

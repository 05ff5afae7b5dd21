"""Beam search over the latent KV cache, with `transformers`' semantics.

Shapes: B prompts, K beams, V vocabulary; the cache holds B*K rows (prompt encoded once, then copied).
Each step scores every beam's extensions, keeps the 2K best of the K*V candidates per prompt, moves
candidates that end (eos, stop id or stop string) into the prompt's finished hypotheses (only if ranked
among the top K, as in transformers) and continues with the K best others. A hypothesis scores
sum(logprobs) / len ** length_penalty (len = generated tokens, the final eos included).

`early_stopping`: True stops a prompt as soon as K hypotheses are finished; False stops when no running
beam can beat the worst kept hypothesis at the current length (transformers' heuristic); "never" when
none can beat it at the longest possible length.
"""

from __future__ import annotations

import torch

from ..errors import GenerationError
from .decoding import new_cache
from .sampling import PenaltyState, SamplingParams, apply_penalties
from .stopping import SequenceState, stop_allowed, stop_ids


class Hypotheses:
    """The K best finished sequences of one prompt."""

    def __init__(self, k: int, length_penalty: float, early_stopping: bool | str, max_len: int) -> None:
        self.k, self.lp, self.early, self.max_len = k, length_penalty, early_stopping, max_len
        self.items: list[tuple[float, list[int]]] = []

    def score(self, logp_sum: float, length: int) -> float:
        return logp_sum / (max(length, 1) ** self.lp)

    def add(self, logp_sum: float, tokens: list[int]) -> None:
        s = self.score(logp_sum, len(tokens))
        if len(self.items) < self.k or s > self.items[-1][0]:
            self.items.append((s, tokens))
            self.items.sort(key=lambda x: -x[0])
            del self.items[self.k:]

    def is_done(self, best_running: float, cur_len: int) -> bool:
        if len(self.items) < self.k:
            return False
        if self.early is True:
            return True
        length = self.max_len if (self.early == "never" and self.lp > 0) else cur_len
        return self.items[-1][0] >= self.score(best_running, length)


def beam_search(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams,
                num_beams: int, length_penalty: float = 1.0, early_stopping: bool | str = False,
                tokenizer=None, cache_mode: str = "latent") -> list[SequenceState]:
    """Beam-search continuations of input_ids [B,T]; returns the best hypothesis of each prompt."""
    if not params.greedy:
        raise GenerationError("beam search does not sample: drop do_sample/temperature or use num_beams=1")
    if early_stopping not in (True, False, "never"):
        raise GenerationError(f"early_stopping must be true, false or 'never', got {early_stopping!r}")
    cfg = model.config
    b, t = input_ids.shape
    k, v, n_max = num_beams, cfg.vocab_size, params.max_new_tokens
    eos = stop_ids(params, cfg.eos_token_id)
    eos_list = sorted(eos)
    dev = input_ids.device
    cache = new_cache(model, b, t + n_max, cache_mode)
    logits = model(input_ids, attention_mask, cache=cache, logits_to_keep=1).logits[:, -1]
    expand = torch.arange(b, device=dev).repeat_interleave(k)
    cache.reorder(expand)  # B -> B*K rows: the prompt is encoded once
    logits = logits.index_select(0, expand)
    prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)] if params.penalised else [[]] * b
    pen = PenaltyState.create([prompts[i // k] for i in range(b * k)], v, dev, active=params.penalised)
    beam_scores = torch.zeros(b, k, device=dev)
    beam_scores[:, 1:] = float("-inf")  # all beams start equal: take the first K from beam 0 only
    beam_scores = beam_scores.view(-1)
    seqs: list[list[int]] = [[] for _ in range(b * k)]
    hyps = [Hypotheses(k, length_penalty, early_stopping, n_max) for _ in range(b)]
    done = [False] * b
    pad = eos_list[0] if eos_list else 0
    for step in range(n_max):
        scores = apply_penalties(logits.float(), [params] * (b * k), pen).log_softmax(dim=-1)
        if eos_list and not stop_allowed(params, step):  # every beam has `step` tokens
            scores[:, eos_list] = float("-inf")
        cand = (beam_scores[:, None] + scores).view(b, k * v)
        top_s, top_i = cand.topk(min(2 * k, k * v), dim=1)
        top_s, top_i = top_s.tolist(), top_i.tolist()
        nxt_s, nxt_tok, nxt_src = [], [], []
        for i in range(b):
            chosen = []
            if not done[i]:
                for rank, (s, idx) in enumerate(zip(top_s[i], top_i[i])):
                    src, tok = i * k + idx // v, idx % v
                    if s == float("-inf"):
                        break
                    if tok in eos or _hits_stop(tokenizer, params, seqs[src] + [tok]):
                        if rank < k:
                            hyps[i].add(s, seqs[src] + [tok])
                        continue
                    chosen.append((s, tok, src))
                    if len(chosen) == k:
                        break
            if not chosen:
                done[i] = True
            else:
                done[i] = done[i] or hyps[i].is_done(chosen[0][0], step + 1)
            chosen += [(float("-inf"), pad, i * k)] * (k - len(chosen))  # finished prompts: filler beams
            for s, tok, src in chosen:
                nxt_s.append(s)
                nxt_tok.append(tok)
                nxt_src.append(src)
        src_t = torch.tensor(nxt_src, device=dev)
        seqs = [seqs[s] + [tok] for s, tok in zip(nxt_src, nxt_tok)]
        beam_scores = torch.tensor(nxt_s, device=dev)
        if all(done) or step == n_max - 1:
            break
        cache.reorder(src_t)
        pen.select(src_t)
        tok_t = torch.tensor(nxt_tok, device=dev)
        pen.update(tok_t)
        logits = model.decode_step(tok_t[:, None], cache)
    for i in range(b):  # prompts that ran out of length: their running beams compete too
        if not done[i]:
            for j in range(i * k, (i + 1) * k):
                if beam_scores[j] > float("-inf"):
                    hyps[i].add(float(beam_scores[j]), seqs[j])
    states = []
    for i in range(b):
        st = SequenceState(params, eos, tokenizer)
        for tok in hyps[i].items[0][1]:
            if not st.finished:
                st.append(tok)
        states.append(st)
    return states


def _hits_stop(tokenizer, params: SamplingParams, tokens: list[int]) -> bool:
    """True when the decoded tokens contain one of the stop strings."""
    if not params.stop or tokenizer is None:
        return False
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return any(s in text for s in params.stop)

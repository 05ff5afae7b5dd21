"""Speculative decoding in the continuous-batching engine: the same tokens, text and logprobs as plain decoding."""

from __future__ import annotations

import pytest
import torch

from seekformer.errors import GenerationError
from seekformer.inference import SamplingParams
from seekformer.inference import speculative as spec
from seekformer.inference.engine import Engine

from .test_inference import ByteTok, tiny_model  # noqa: F401

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [20, 21, 22, 23], [3], list(range(40, 61)), [7] * 9, [30, 31, 32]]


def _requests():
    """Greedy rows (eos on/off, min_new_tokens, logprobs), a sampled row and a penalised row."""
    g = dict(ignore_eos=True)
    return [SamplingParams(max_new_tokens=14, **g), SamplingParams(max_new_tokens=25, logprobs=2, **g),
            SamplingParams(max_new_tokens=9, eos_token_id=(50, 97, 120), min_new_tokens=3),
            SamplingParams(max_new_tokens=30, **g),
            SamplingParams(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=20, seed=7, **g),
            SamplingParams(max_new_tokens=11, repetition_penalty=1.3, **g),
            SamplingParams(max_new_tokens=17, stop_token_ids=(64, 65, 66), **g)]


def _run(engine: Engine, params: list[SamplingParams]) -> tuple[dict, int]:
    """Run every prompt; returns ({prompt index: (tokens, logprobs, finish)}, most events of one request in a step)."""
    ids = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, params)]
    out = {rid: ([], [], None) for rid in ids}
    most = 0
    while engine.has_work():
        per: dict[str, int] = {}
        for ev in engine.step():
            toks, lps, _ = out[ev.request_id]
            if ev.token_id is not None:
                toks.append(ev.token_id)
                assert ev.index == len(toks) - 1
                per[ev.request_id] = per.get(ev.request_id, 0) + 1
            if ev.logprob is not None:
                lps.append(ev.logprob)
            if ev.finished:
                out[ev.request_id] = (toks, lps, ev.finish_reason)
        most = max([most, *per.values()])
    return {i: out[rid] for i, rid in enumerate(ids)}, most


@pytest.mark.parametrize("depth,k,mode", [(1, 1, "latent"), (2, 2, "latent"), (2, 2, "naive"), (1, 3, "latent")])
def test_engine_speculation_gives_the_plain_tokens(depth, k, mode):
    model = tiny_model(seed=3, num_nextn_predict_layers=depth)
    params = _requests()
    # 7 requests through 3 rows (joins, leaves, row moves); prompts over 8 tokens are prefilled in chunks
    plain, _ = _run(Engine(model, max_batch_size=3, max_length=64, cache_mode=mode, prefill_chunk=8,
                           speculative=False), params)
    fast_engine = Engine(model, max_batch_size=3, max_length=64, cache_mode=mode, prefill_chunk=8, speculative=True,
                         num_speculative_tokens=k)
    fast, _ = _run(fast_engine, params)
    for i in plain:
        assert fast[i][0] == plain[i][0], i
        assert fast[i][2] == plain[i][2], i
        assert fast[i][1] == pytest.approx(plain[i][1], abs=1e-4), i
    assert fast_engine.batch.spec_stats["forwards"] > 0
    for i, (toks, _, _) in plain.items():  # and plain greedy decoding is `generate`
        if params[i].greedy and not params[i].penalised:
            kw = {k: getattr(params[i], k) for k in ("max_new_tokens", "ignore_eos", "min_new_tokens",
                                                    "stop_token_ids", "eos_token_id")}
            assert model.generate([PROMPTS[i]], **kw)[0, len(PROMPTS[i]):].tolist()[:len(toks)] == toks


def test_engine_speculation_with_stop_strings_gives_the_plain_text():
    tok = ByteTok()
    model = tiny_model(seed=4, vocab_size=320, num_nextn_predict_layers=1)
    prompts = [tok.encode(t) for t in ("the cat sat on", "a b c d e f g", "hello")]
    texts = {}
    for speculative in (False, True):
        engine = Engine(model, tok, max_batch_size=2, max_length=64, speculative=speculative)
        done = engine.generate(prompts, SamplingParams(max_new_tokens=20, stop=("e", "th"), ignore_eos=True))
        texts[speculative] = [(c.text, c.token_ids, c.finish_reason) for c in done]
    assert texts[True] == texts[False]


def test_accepted_drafts_give_several_tokens_per_step(monkeypatch):
    """With drafts from the true greedy continuation every draft is accepted: K+1 tokens per step and forward."""
    model = tiny_model(seed=5, num_nextn_predict_layers=2)
    want = {tuple(p): model.generate([p], max_new_tokens=20, ignore_eos=True)[0, len(p):].tolist() for p in PROMPTS[:3]}

    def oracle(self, toks):
        out = []
        for t in toks:
            p = next(q for q in want if list(q) == t[:len(q)])
            nxt = want[p][len(t) - len(p): len(t) - len(p) + self.k]
            out.append(nxt + [0] * (self.k - len(nxt)))
        return out

    monkeypatch.setattr(spec.MTPDrafter, "draft", oracle)
    engine = Engine(model, max_batch_size=3, max_length=64, speculative=True)
    done = engine.generate([list(p) for p in want], max_new_tokens=20, ignore_eos=True)
    assert [c.token_ids for c in done] == list(want.values())
    stats = engine.batch.spec_stats
    assert stats["accepted"] >= 0.9 * stats["proposed"] > 0  # (drafts past max_new_tokens are padding)
    assert stats["forwards"] <= 7  # 19 tokens after the first, 3 per forward


def test_requests_opt_in_and_bad_use():
    model = tiny_model(seed=6, num_nextn_predict_layers=1)
    engine = Engine(model, max_batch_size=2, max_length=64)  # default: only requests that ask
    plain = engine.generate([PROMPTS[0]], max_new_tokens=10, ignore_eos=True)
    assert engine.batch.spec_stats["forwards"] == 0
    fast = engine.generate([PROMPTS[0]], max_new_tokens=10, ignore_eos=True, speculative=True)
    assert engine.batch.spec_stats["forwards"] > 0 and fast[0].token_ids == plain[0].token_ids
    off = Engine(model, max_batch_size=2, max_length=64, speculative=False)
    with pytest.raises(GenerationError, match="speculative"):
        off.add_request([5, 6], SamplingParams(speculative=True))
    with pytest.raises(GenerationError, match="MTP"):
        Engine(tiny_model(), speculative=True)
    with pytest.raises(GenerationError, match="num_speculative_tokens"):
        Engine(model, speculative=True, num_speculative_tokens=spec.MAX_DRAFTS + 1)


def test_long_plain_stretches_keep_the_drafter_bounded():
    """Plain steps of a drafting engine hand their hidden states to the drafter, which catches up past
    BACKLOG positions; a later speculative request still decodes the plain tokens."""
    from seekformer.inference.decoding import BACKLOG

    model = tiny_model(seed=7, num_nextn_predict_layers=1)
    engine = Engine(model, max_batch_size=2, max_length=256)
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=BACKLOG * 2, ignore_eos=True))
    while engine.has_work():
        engine.step()
        assert engine.batch.drafter.backlog(engine.num_running) <= BACKLOG + 1
    assert rid
    with torch.no_grad():
        out = engine.generate([PROMPTS[1], PROMPTS[2]], max_new_tokens=40, ignore_eos=True, speculative=True)
    assert [c.token_ids for c in out] == [model.generate([p], max_new_tokens=40, ignore_eos=True)[0, len(p):].tolist()
                                          for p in (PROMPTS[1], PROMPTS[2])]

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
            SamplingParams(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=20, seed=7, speculative=False, **g),
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


def test_plain_steps_with_a_drafter_stay_bounded_then_speculate_exactly():
    """DecodeBatch.decode hands the hidden states of tracked rows to the drafter, which catches up past
    BACKLOG positions; speculative steps afterwards still give the greedy tokens. The engine tracks only
    requests that speculate."""
    from seekformer.inference.decoding import BACKLOG, DecodeBatch, Row, new_cache
    from seekformer.inference.stopping import SequenceState

    model = tiny_model(seed=7, num_nextn_predict_layers=1)
    n_plain, n_all = BACKLOG * 2, BACKLOG * 2 + 30
    want = model.generate([PROMPTS[0]], max_new_tokens=n_all, ignore_eos=True)[0, len(PROMPTS[0]):].tolist()
    batch = DecodeBatch(model, new_cache(model, 1, 200), drafter=spec.MTPDrafter(model, 1, 200, 2))
    batch.admit([Row(SequenceState(SamplingParams(max_new_tokens=n_all, ignore_eos=True), set()))])
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        batch.choose(batch.prefill(0, 1, ids, torch.ones_like(ids)), 0, 1)
        for _ in range(n_plain - 1):
            batch.choose(batch.decode())
            assert batch.drafter.backlog(1) <= BACKLOG + 1
        while batch.rows and not batch.rows[0].state.finished:
            batch.speculate([True])
    assert batch.rows[0].state.tokens == want
    engine = Engine(model, max_batch_size=2, max_length=256)
    engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=20, ignore_eos=True))
    engine.step()
    assert engine.batch.drafter.prefix[0] == [] and engine.batch.drafter.backlog(1) == 0  # not tracked


def test_speculative_sampling_keeps_the_target_distribution():
    """With one-hot drafts: the first token follows p_0; after an accepted draft the next follows p_1; after
    K accepted drafts the extra token follows p_K (empirical frequencies of 6,000 draws, 5 sigma)."""
    from seekformer.inference.sampling import speculative_sample

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 5, generator=g) + 0.05
    probs = probs / probs.sum(-1, keepdim=True)
    drafts, n = [1, 3], 6000
    first = torch.zeros(5)
    second_given = torch.zeros(5)
    third_given = torch.zeros(5)
    for _ in range(n):
        out = speculative_sample(probs, drafts, g)
        assert 1 <= len(out) <= 3 and out[:len(out) - 1] == drafts[:len(out) - 1]
        first[out[0]] += 1
        if out[0] == drafts[0]:
            second_given[out[1]] += 1
            if out[1] == drafts[1]:
                third_given[out[2]] += 1
    for freq, p in ((first, probs[0]), (second_given, probs[1]), (third_given, probs[2])):
        m = freq.sum()
        assert m > 300
        assert torch.all((freq / m - p).abs() <= 5 * (p * (1 - p) / m).sqrt() + 1e-3), (freq / m, p)


def test_engine_speculative_sampling_is_seeded_and_valid():
    model = tiny_model(seed=8, num_nextn_predict_layers=1)
    engine = Engine(model, max_batch_size=2, max_length=64, speculative=True, num_speculative_tokens=2)
    params = SamplingParams(max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True,
                            logprobs=0)
    a = engine.generate([PROMPTS[0], PROMPTS[1]], params)
    b = engine.generate([PROMPTS[0], PROMPTS[1]], params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]  # the row's generator drives every draw
    assert all(len(c.token_ids) == 16 and len(c.logprobs) == 16 for c in a)
    assert engine.batch.spec_stats["proposed"] > 0

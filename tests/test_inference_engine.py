"""Continuous-batching engine and scoring helpers."""

from __future__ import annotations

import threading

import pytest
import torch

from seekformer.errors import GenerationError
from seekformer.inference import SamplingParams
from seekformer.inference.engine import Engine
from seekformer.inference.scoring import loglikelihood, score_tokens

from .test_inference import ByteTok, tiny_model  # noqa: F401

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [20, 21, 22, 23], [3], list(range(40, 51)), [7] * 9]


def test_engine_greedy_equals_generate_with_joins_and_leaves():
    model = tiny_model()
    engine = Engine(model, max_batch_size=3, max_length=64)  # 6 requests through 3 rows
    lens = [5, 17, 9, 30, 3, 12]
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in zip(PROMPTS, lens)]
    got: dict[str, list[int]] = {}
    finish: dict[str, str] = {}
    max_running = 0
    while engine.has_work():
        for ev in engine.step():
            got.setdefault(ev.request_id, []).append(ev.token_id)
            if ev.finished:
                finish[ev.request_id] = ev.finish_reason
        max_running = max(max_running, engine.num_running)
    assert max_running == 3
    for rid, p, n in zip(ids, PROMPTS, lens):
        assert got[rid] == model.generate([p], max_new_tokens=n, ignore_eos=True)[0, len(p):].tolist()
        assert finish[rid] == "length"


def test_engine_prefills_similar_prompts_together():
    """Requests waiting together are prefilled in one left-padded forward when their lengths are close;
    the output equals each prompt decoded alone."""
    model = tiny_model()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [20, 21, 22, 23], [3], [7] * 9, list(range(40, 120))]
    engine = Engine(model, max_batch_size=8, max_length=128)
    out = engine.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    for c, p in zip(out, prompts):
        assert c.token_ids == model.generate([p], max_new_tokens=8, ignore_eos=True)[0, len(p):].tolist()
    assert engine.prefilled_requests == 6
    assert engine.prefill_forwards == 2  # the five short prompts together; the 80-token one would pad too much
    tight = Engine(model, max_batch_size=8, max_length=20)  # padding to 9 + 8 new tokens fits, to 80 would not
    tight.generate(prompts[:5], SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert tight.prefill_forwards == 1


def test_engine_sampling_independent_of_batching():
    model = tiny_model()
    sp = SamplingParams(max_new_tokens=10, do_sample=True, top_p=0.9, repetition_penalty=1.2, seed=7)
    together = Engine(model, max_batch_size=4).generate(PROMPTS, sp)
    for c, p in zip(together, PROMPTS):
        assert Engine(model, max_batch_size=1).generate([p], sp)[0].token_ids == c.token_ids


def test_engine_stop_ids_logprobs_and_cancel():
    model = tiny_model()
    engine = Engine(model, max_batch_size=2)
    first = model.generate([PROMPTS[0]], max_new_tokens=6, ignore_eos=True)[0, 6:].tolist()
    r_stop = engine.add_request(PROMPTS[0], max_new_tokens=20, stop_token_ids=(first[3],), ignore_eos=True,
                                logprobs=3)
    r_cancel = engine.add_request(PROMPTS[1], max_new_tokens=50)
    r_wait = engine.add_request(PROMPTS[2], max_new_tokens=50)
    events = engine.step()
    assert {e.request_id for e in events} == {r_stop, r_cancel}
    assert engine.cancel(r_cancel) and engine.cancel(r_wait) and not engine.cancel("nope")
    events += engine.step()
    ended = {e.request_id: e.finish_reason for e in events if e.finished}
    assert ended == {r_cancel: "cancelled", r_wait: "cancelled"}
    while engine.has_work():
        events += engine.step()
    mine = [e for e in events if e.request_id == r_stop]
    assert [e.token_id for e in mine] == first[:4] and mine[-1].finish_reason == "stop"
    with torch.no_grad():
        logp = model(torch.tensor([PROMPTS[0] + first[:3]])).logits[0, 5:].log_softmax(-1)
    for j, e in enumerate(mine):
        assert e.index == j and e.logprob == pytest.approx(float(logp[j, e.token_id]), abs=1e-4)
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0][1] >= e.logprob - 1e-6


def test_engine_text_stop_strings_and_threads():
    tok = ByteTok()
    model = tiny_model(vocab_size=tok.vocab_size, seed=5)
    engine = Engine(model, tokenizer=tok, max_batch_size=2)
    opts = dict(max_new_tokens=30, do_sample=True, seed=3, temperature=1.3)
    full = engine.generate([tok.encode("héllo")], **opts)[0]
    assert full.text == tok.decode(full.token_ids)
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    threads = [threading.Thread(target=engine.add_request, args=(tok.encode("héllo"),), kwargs={**opts, "stop": (stop,)})
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    texts: dict[str, str] = {}
    while engine.has_work():
        for ev in engine.step():
            texts[ev.request_id] = texts.get(ev.request_id, "") + ev.text
    assert list(texts.values()) == [full.text[: full.text.index(stop)]] * 3


def test_engine_rejects_bad_requests():
    engine = Engine(tiny_model(), max_batch_size=2, max_length=32)
    for prompt, kw in [([], {}), ([5] * 30, {"max_new_tokens": 10}), ([999], {}), ([5], {"top_k": -1}),
                       ([5], {"stop": ("x",)})]:
        with pytest.raises(GenerationError):
            engine.add_request(prompt, **kw)
    engine.add_request([5], request_id="a", max_new_tokens=4)
    with pytest.raises(GenerationError):
        engine.add_request([6], request_id="a", max_new_tokens=4)


def test_loglikelihood():
    model = tiny_model()
    ctx = [5, 6, 7, 8]
    greedy = model.generate([ctx], max_new_tokens=3, ignore_eos=True)[0, 4:].tolist()
    with torch.no_grad():
        logp = model(torch.tensor([ctx + greedy])).logits[0].log_softmax(-1)
    expect = sum(float(logp[3 + i, t]) for i, t in enumerate(greedy))
    (total, is_greedy), = loglikelihood(model, [(ctx, greedy)])
    assert total == pytest.approx(expect, abs=1e-4) and is_greedy
    other = [greedy[0], (greedy[1] + 1) % 256]
    reqs = [(ctx, greedy), ([9], [10, 11, 12]), (ctx, other), ([], [4])]
    batch = loglikelihood(model, reqs, batch_size=3)
    assert batch[0][0] == pytest.approx(total, abs=1e-4) and batch[0][1]
    assert not batch[2][1]
    for req, got in zip(reqs, batch):
        assert got == pytest.approx(loglikelihood(model, [req])[0], abs=1e-4)
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else model.config.eos_token_id
    assert batch[3] == pytest.approx(loglikelihood(model, [([bos], [4])])[0], abs=1e-4)  # empty context: bos
    s = score_tokens(model, [ctx + greedy], top_n=2)[0]  # a completions API's prompt logprobs
    assert float(s.logprobs[3]) == pytest.approx(float(logp[3, greedy[0]]), abs=1e-4)
    assert int(s.top_ids[3, 0]) == greedy[0]


def test_one_min_new_tokens_rule_for_every_decoder():
    """generate, the engine, beam search (1 beam) and speculative decoding share the min_new_tokens rule:
    a stop id the model prefers early is held back until min_new_tokens, and all four agree."""
    from seekformer.inference.stopping import SequenceState, early_stop_mask, stop_allowed

    model = tiny_model(num_nextn_predict_layers=1)
    prompt = PROMPTS[0]
    free = model.generate([prompt], max_new_tokens=8, ignore_eos=True)[0, len(prompt):].tolist()
    eos = free[1]  # the model would end after 2 tokens with this stop id
    opts = dict(max_new_tokens=8, eos_token_id=eos, min_new_tokens=5)
    early = model.generate([prompt], max_new_tokens=8, eos_token_id=eos)[0, len(prompt):].tolist()
    assert early == free[:2]
    want = model.generate([prompt], **opts)[0, len(prompt):].tolist()
    assert eos not in want[:5] and len(want) >= 5
    assert model.generate([prompt], num_beams=1, **opts)[0, len(prompt):].tolist() == want
    assert model.generate([prompt], speculative=True, **opts)[0, len(prompt):].tolist() == want
    assert Engine(model, max_batch_size=2).generate([prompt], SamplingParams(**opts))[0].token_ids == want
    # the rule itself: stop ids banned for the generated positions before min_new_tokens, per row
    p = SamplingParams(min_new_tokens=3)
    assert [stop_allowed(p, n) for n in range(5)] == [False, False, False, True, True]
    states = [SequenceState(p, {2, 4}), SequenceState(SamplingParams(), {2})]
    states[0].append(9)
    mask = early_stop_mask(states, 6, "cpu", steps=3)
    assert mask[0].nonzero().tolist() == [[0, 2], [0, 4], [1, 2], [1, 4]] and not mask[1].any()
    assert early_stop_mask(states[1:], 6, "cpu") is None


def test_decoders_share_helpers_without_an_import_circle():
    """beam, speculative and the engine import the shared decoding helpers, never generate (no circle);
    nothing in inference/ repeats the model's math (no module reaches into the model's layers)."""
    import ast
    from pathlib import Path

    import seekformer.inference as inf

    root = Path(inf.__file__).parent
    for name in ("beam", "speculative", "engine", "decoding", "sampling", "stopping", "scoring"):
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "generate" not in imported, name
    assert not (root / "runner.py").exists()
    for path in root.glob("*.py"):
        text = path.read_text()
        assert not any(s in text for s in ("embed_tokens", "lm_head", ".layers", "mla_decode", "few_rows")), path

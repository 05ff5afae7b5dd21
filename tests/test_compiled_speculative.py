"""Compiled self-speculative decoding (one graph per step: MTP drafts + verification of K+1 tokens,
`SeekForCausalLM.static_speculate_step`, `MTPDrafter.fused`): the greedy tokens, drafts equal to the MTP
module run without a cache, verification logits equal to an uncached forward. The fast tests run the graph
function eagerly (torch.compile replaced by the identity); the real inductor compilation is the slow test."""

from __future__ import annotations

import pytest
import torch

from .conftest import tiny_config
from .test_inference_speculative import _reference_chained_drafts
from seekformer.inference import speculative as spec
from seekformer.models.causal_lm import SeekForCausalLM

PROMPT = [5, 6, 7, 8, 9, 10, 11]


def _model(seed: int = 2, **overrides) -> SeekForCausalLM:
    torch.manual_seed(seed)
    model = SeekForCausalLM(tiny_config(num_nextn_predict_layers=1, **overrides)).eval()
    with torch.no_grad():  # non-zero correction biases: routing that differs per token
        for _, moe in model.moe_layers():
            moe.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    return model


def _predictable(model: SeekForCausalLM) -> SeekForCausalLM:
    """Make the MTP drafts right most of the time: the FFNs write nothing, attention writes little, so the
    next greedy token is about a function of the current one, and the MTP module sees the token it must
    continue (eh_proj passes the normed embedding). Attention still reads the caches (small, not zero)."""
    with torch.no_grad():
        for layer in [*model.model.layers, model.mtp[0].block]:
            layer.self_attn.o_proj.weight.mul_(0.05)
            for name, p in layer.mlp.named_parameters():
                if "down" in name:
                    p.zero_()
        d = model.config.hidden_size
        model.mtp[0].eh_proj.weight.copy_(torch.cat([torch.eye(d), torch.zeros(d, d)], dim=1))
        model.mtp[0].shared_head.norm.weight.copy_(model.model.norm.weight)
    return model


@pytest.fixture
def traced_eagerly(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)


def _spy_fused(monkeypatch) -> list:
    """Record (confirmed tokens, drafts, verification logits) of every fused step that ran."""
    seen = []
    real = spec.MTPDrafter.fused

    def spy(self, toks, cache, graph):
        out = real(self, toks, cache, graph)
        if out is not None:
            seen.append((list(toks), out[0], out[1].clone()))
        return out

    monkeypatch.setattr(spec.MTPDrafter, "fused", spy)
    return seen


@pytest.mark.parametrize("k,predictable", [(1, False), (3, False), (3, True), (2, True)])
def test_fused_steps_equal_greedy_and_uncached_model(traced_eagerly, monkeypatch, k, predictable):
    model = _model()
    if predictable:
        _predictable(model)
    greedy = model.generate([PROMPT], max_new_tokens=24, ignore_eos=True)
    seen = _spy_fused(monkeypatch)
    out = model.generate([PROMPT], max_new_tokens=24, ignore_eos=True, speculative=True,
                         num_speculative_tokens=k, compile=True, return_dict=True)
    assert torch.equal(out.sequences, greedy)
    assert len(seen) == out.stats["main_forwards"] - 1  # every step but the prefill
    if predictable:
        assert out.stats["acceptance_rate"] > 0.5  # catch-up of several positions per step is exercised
    with torch.no_grad():
        for toks, drafts, logits in seen:
            assert drafts == _reference_chained_drafts(model, toks, k)
            full = model(torch.tensor([toks + drafts])).logits[0, -(k + 1):]
            torch.testing.assert_close(logits[0], full, rtol=1e-4, atol=1e-4)


def test_fused_matches_eager_speculation_stats(traced_eagerly):
    """Same drafts, same acceptance, same number of forwards as the eager speculative path."""
    model = _predictable(_model(seed=3))
    kw = dict(max_new_tokens=30, ignore_eos=True, speculative=True, num_speculative_tokens=3, return_dict=True)
    eager, fused = model.generate([PROMPT], **kw), model.generate([PROMPT], compile=True, **kw)
    assert torch.equal(eager.sequences, fused.sequences)
    for key in ("proposed", "accepted", "main_forwards"):
        assert eager.stats[key] == fused.stats[key]
    assert model.__dict__["_compiled_speculation"].calls == fused.stats["main_forwards"] - 1


def test_fused_not_used_for_batches_or_depth_2(traced_eagerly):
    model = _model()
    rows = [PROMPT, [3, 4, 5]]
    assert torch.equal(model.generate(rows, max_new_tokens=10, ignore_eos=True, speculative=True, compile=True),
                       model.generate(rows, max_new_tokens=10, ignore_eos=True))
    torch.manual_seed(0)
    deep = SeekForCausalLM(tiny_config(num_nextn_predict_layers=2)).eval()
    assert torch.equal(deep.generate([PROMPT], max_new_tokens=10, ignore_eos=True, speculative=True, compile=True),
                       deep.generate([PROMPT], max_new_tokens=10, ignore_eos=True))
    assert deep.__dict__["_compiled_speculation"].calls == 0


def test_engine_speculation_uses_the_graph(traced_eagerly):
    from seekformer.inference import Engine, SamplingParams

    model = _predictable(_model())
    want = model.generate([PROMPT], max_new_tokens=16, ignore_eos=True)[0, len(PROMPT):].tolist()
    eng = Engine(model, max_batch_size=2, max_length=64, speculative=True, num_speculative_tokens=3, compile=True)
    out = eng.generate([PROMPT], SamplingParams(max_new_tokens=16, ignore_eos=True))
    assert out[0].token_ids == want
    assert model.__dict__["_compiled_speculation"].calls > 0


def test_fused_graph_failure_falls_back(monkeypatch):
    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    model = _model()
    with pytest.warns(UserWarning, match="compiled speculative decoding unavailable"):
        out = model.generate([PROMPT], max_new_tokens=12, ignore_eos=True, speculative=True, compile=True)
    assert torch.equal(out, model.generate([PROMPT], max_new_tokens=12, ignore_eos=True))


@pytest.mark.slow
def test_inductor_compiled_speculation_equals_greedy():
    """The real thing: the inductor-compiled speculative step gives the greedy tokens."""
    model = _predictable(_model(num_hidden_layers=2))
    out = model.generate([PROMPT], max_new_tokens=16, ignore_eos=True, speculative=True, num_speculative_tokens=2,
                         compile=True, return_dict=True)
    assert torch.equal(out.sequences, model.generate([PROMPT], max_new_tokens=16, ignore_eos=True))
    graph = model.__dict__["_compiled_speculation"]
    assert graph.failed is None and graph.calls == out.stats["main_forwards"] - 1

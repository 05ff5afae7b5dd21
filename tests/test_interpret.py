"""Routing and attention capture: parity with `transformers` on the same directory, no cost when off,
and the `seekformer inspect` command (JSON, PNGs, bad input)."""

from __future__ import annotations


import pytest
import torch

from seekformer.interpret import capture, forward_with_capture
from seekformer.interpret.capture import InspectError
from seekformer.models.causal_lm import SeekForCausalLM

from .conftest import tiny_config

transformers = pytest.importorskip("transformers")

from .test_parity import build_hf  # noqa: E402


def _hf_routing_and_attention(hf, ids):
    """Top-k ids/weights per MoE layer (hooks on DeepseekV3TopkRouter) and eager attention probabilities."""
    routed, handles = {}, []
    for i, layer in enumerate(hf.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None:
            def hook(mod, args, out, i=i):
                routed[i] = (out[2], out[1])  # (indices [N,K], weights [N,K])
            handles.append(gate.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = hf(input_ids=ids, output_attentions=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return routed, out.attentions


@pytest.mark.parametrize("case", [{}, dict(q_lora_rank=None, n_shared_experts=2, first_k_dense_replace=0),
                                  dict(n_group=1, topk_group=1, num_experts_per_tok=3)])
def test_capture_matches_transformers(tmp_path, case):
    build_hf("v3", seed=3, num_key_value_heads=4, **case).save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sf = SeekForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, hf.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    routed, attentions = _hf_routing_and_attention(hf, ids)
    _, cap = forward_with_capture(sf, ids)
    assert sorted(cap.routing) == sorted(routed) and routed
    for i, (idx_hf, w_hf) in routed.items():
        r = cap.routing[i]
        sf_sets = r.indices[0].sort(-1).values
        hf_sets = idx_hf.sort(-1).values
        assert torch.equal(sf_sets, hf_sets), f"layer {i}: different top-k sets"
        w_sf = r.weights[0].gather(-1, r.indices[0].argsort(-1))
        w_hf_sorted = w_hf.gather(-1, idx_hf.argsort(-1))
        torch.testing.assert_close(w_sf, w_hf_sorted.float(), atol=1e-5, rtol=1e-5)
        assert r.scores.shape == (1, 40, hf.config.n_routed_experts)
        bias = sf.model.layers[i].mlp.gate.e_score_correction_bias
        torch.testing.assert_close(r.choice_scores, r.scores + bias)
        if hf.config.n_shared_experts:
            assert r.shared_share.shape == (1, 40) and bool(((r.shared_share > 0) & (r.shared_share < 1)).all())
    assert len(cap.attention) == len(attentions)
    for i, a_hf in enumerate(attentions):
        assert cap.attention[i].shape == a_hf.shape
        assert float((cap.attention[i] - a_hf).abs().max()) <= 1e-4


def test_capture_padding_mask_matches_forward():
    """With a padding mask the probabilities use the model's own mask; rows sum to 1."""
    torch.manual_seed(0)
    model = SeekForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, 256, (2, 12))
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, :4] = 0
    _, cap = forward_with_capture(model, ids, attention_mask=am)
    p = cap.attention[0]
    assert p.shape == (2, 4, 12, 12)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 12))
    assert float(p[1, :, 6, :4].abs().max()) == 0.0  # padded keys get no attention


def test_no_hooks_left_and_no_cost_when_off():
    model = SeekForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, 256, (1, 10))
    with torch.no_grad():
        ref = model(ids).logits
    with capture(model, routing=True, attention=True) as cap:
        with torch.no_grad():
            got = model(ids).logits
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    assert cap.routing and cap.attention
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert not any(isinstance(v, torch.Tensor) and v.numel() and n.startswith("captured") for n, v in vars(model).items())


def test_capture_ignores_other_threads():
    import threading

    model = SeekForCausalLM(tiny_config()).eval()
    with capture(model, attention=True) as cap:
        t = threading.Thread(target=lambda: model(torch.randint(3, 256, (1, 5))))
        t.start()
        t.join()
    assert not cap.routing and not cap.attention


def test_bad_layers_and_lengths():
    model = SeekForCausalLM(tiny_config(max_position_embeddings=16)).eval()
    with pytest.raises(InspectError, match="unknown layer 7"):
        with capture(model, layers=[7]):
            pass
    with pytest.raises(InspectError, match="context is 16"):
        forward_with_capture(model, torch.zeros(1, 17, dtype=torch.long))


def test_ablation_and_router_bias_are_exact_and_restored():
    from seekformer.interpret.ablation import ablate_experts, bias_router

    torch.manual_seed(0)
    model = SeekForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, 256, (1, 24))
    _, ref = forward_with_capture(model, ids, attention=False)
    base = model(ids).logits.detach()
    victim = int(ref.routing[1].indices[0, 0, 0])
    with ablate_experts(model, {1: [victim]}):
        _, cap = forward_with_capture(model, ids, attention=False)
        ablated = model(ids).logits.detach()
    r = cap.routing[1]
    assert torch.equal(r.indices, ref.routing[1].indices)  # zero mode keeps the choice...
    assert float(r.weights[r.indices == victim].abs().max()) == 0.0  # ...and drops the expert's weight
    assert not torch.allclose(ablated, base)
    with ablate_experts(model, {1: [victim]}, mode="reroute"):
        _, cap = forward_with_capture(model, ids, attention=False)
    assert not bool((cap.routing[1].indices == victim).any())
    bias_before = model.model.layers[2].mlp.gate.e_score_correction_bias.clone()
    with bias_router(model, {2: {5: 10.0}}):
        _, cap = forward_with_capture(model, ids, attention=False)
    assert bool((cap.routing[2].indices == 5).any(-1).all())  # every token now uses expert 5
    assert torch.equal(model.model.layers[2].mlp.gate.e_score_correction_bias, bias_before)
    torch.testing.assert_close(model(ids).logits, base, atol=0, rtol=0)
    with pytest.raises(InspectError, match="not an MoE layer"):
        with ablate_experts(model, {0: [1]}):
            pass
    with pytest.raises(InspectError, match="experts 0..7"):
        with ablate_experts(model, {1: [8]}):
            pass


def test_statistics_definitions():
    from seekformer.interpret.capture import Capture, LayerRouting
    from seekformer.interpret.stats import RoutingAccumulator, js_divergence

    assert js_divergence([1, 0], [1, 0]) == 0.0
    assert abs(js_divergence([1, 0], [0, 1]) - 1.0) < 1e-12
    assert 0 < js_divergence([0.5, 0.5], [0.9, 0.1]) < 1
    # 4 tokens, K=2 of E=4: tokens 0-1 share both experts, 1-2 share one, 2-3 share none
    idx = torch.tensor([[[0, 1], [0, 1], [1, 2], [3, 0]]])
    cap = Capture(routing={1: LayerRouting(1, idx, torch.ones(1, 4, 2), torch.zeros(1, 4, 4), torch.zeros(1, 4, 4),
                                           None)}, moe_layers=[1])
    acc = RoutingAccumulator([1], num_experts=4, top_k=2)
    acc.add(cap)
    s = acc.summary()["layers"][0]
    assert s["counts"] == [3, 3, 1, 1] and s["load"] == [0.375, 0.375, 0.125, 0.125]
    assert s["same_expert_rate"] == pytest.approx((1 + 0.5 + 0) / 3, abs=1e-6)
    f = torch.tensor([3, 3, 1, 1]) / 4
    assert s["same_expert_chance"] == pytest.approx(float((f * f).sum()) / 2, abs=1e-6)
    assert s["max_over_mean"] == 1.5 and s["min_over_mean"] == 0.5 and s["top_quarter_share"] == 0.375


def test_capture_knows_mla_forward_arguments():
    import inspect

    import importlib

    from seekformer.nn.attention import MLA

    capture = importlib.import_module("seekformer.interpret.capture")
    assert capture._MLA_ARGS == tuple(inspect.signature(MLA.forward).parameters)[1:]

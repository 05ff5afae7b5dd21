"""Logits parity with `transformers` DeepseekV3 / DeepseekV2, both ways, on the same random weights.

hf -> seekformer: a tiny random model built in transformers is saved with `save_pretrained` and loaded
with `SeekForCausalLM.from_pretrained`. seekformer -> hf: the loaded model is saved by seekformer and
loaded back with `AutoModelForCausalLM.from_pretrained`, which must report no missing, unexpected or
mis-shaped weights. Target (fp32): max |logits diff| <= 1e-4 and 32 greedy tokens identical.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from seekformer.models.causal_lm import SeekForCausalLM, positions_from_mask  # noqa: E402

TOL = 1e-4
GREEDY_TOKENS = 32


BASE = dict(
    vocab_size=101, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
    num_attention_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
    n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, n_shared_experts=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=False,
    initializer_range=0.08, rms_norm_eps=1e-5, num_nextn_predict_layers=0,
)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 0.9, "mscale_all_dim": 0.7, "original_max_position_embeddings": 64}

V3_CASES = {
    "base": {},
    "no_q_lora-dense0-shared0": dict(q_lora_rank=None, first_k_dense_replace=0, n_shared_experts=0),
    "shared2-tied-no_norm_topk": dict(n_shared_experts=2, tie_word_embeddings=True, norm_topk_prob=False),
    "groups1-rsf1-dense2": dict(n_group=1, topk_group=1, routed_scaling_factor=1.0, first_k_dense_replace=2),
    "yarn-mscale": dict(rope_parameters=YARN),
    "no_interleave-top1": dict(rope_interleave=False, num_experts_per_tok=1, n_group=2, topk_group=1),
    "groups8-top3": dict(n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=3),
}
V2_CASES = {
    "v2-greedy": dict(topk_method="greedy", n_group=None, topk_group=None, n_shared_experts=2),
    "v2-group_limited": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, q_lora_rank=None,
                             routed_scaling_factor=16.0, first_k_dense_replace=0),
    "v2-yarn": dict(topk_method="greedy", n_group=None, topk_group=None, rope_parameters=YARN),
}


def build_hf(kind: str, seed: int = 0, **overrides):
    """A tiny random transformers DeepseekV3/V2 model in eval mode, norms and correction bias perturbed."""
    kw = dict(BASE, **overrides)
    if kind == "v2":
        for k in ("tie_word_embeddings",):
            kw.setdefault(k, False)
        kw.pop("num_nextn_predict_layers", None)
        kw.pop("rope_interleave", None)
        config = transformers.DeepseekV2Config(**kw)
        cls = transformers.DeepseekV2ForCausalLM
    else:
        config = transformers.DeepseekV3Config(**kw)
        cls = transformers.DeepseekV3ForCausalLM
    torch.manual_seed(seed)
    model = cls(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # selection-only bias: make it matter
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))
    return model


def hf_logits(model, ids, attention_mask=None, position_ids=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits


def sf_logits(model, ids, attention_mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=attention_mask).logits


def greedy(step, ids: torch.Tensor, n: int = GREEDY_TOKENS) -> torch.Tensor:
    """Argmax decoding without a cache: `step(ids) -> logits [B,T,V]`."""
    for _ in range(n):
        nxt = step(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def hf_load_clean(path):
    """Load with transformers and assert it reports no missing / unexpected / mis-shaped weights."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    assert not info["error_msgs"], info["error_msgs"]
    return model.eval()


def roundtrip(kind, tmp_path, **overrides):
    hf = build_hf(kind, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    sf = SeekForCausalLM.from_pretrained(tmp_path / "hf")
    sf.save_pretrained(tmp_path / "sf")
    hf2 = hf_load_clean(tmp_path / "sf")
    return hf, sf, hf2


@pytest.mark.parametrize("kind,overrides", [("v3", v) for v in V3_CASES.values()] +
                         [("v2", v) for v in V2_CASES.values()], ids=list(V3_CASES) + list(V2_CASES))
def test_logits_and_greedy_parity_both_ways(kind, overrides, tmp_path):
    hf, sf, hf2 = roundtrip(kind, tmp_path, **overrides)
    assert type(hf2) is type(hf)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, BASE["vocab_size"], (3, 24), generator=gen)
    ref = hf_logits(hf, ids)
    assert ref.abs().max() > 1.0  # logits large enough for the tolerance to mean something
    ours = sf_logits(sf, ids)
    back = hf_logits(hf2, ids)
    assert maxdiff(ref, ours) <= TOL
    assert maxdiff(ours, back) <= TOL
    prompt = ids[:2, :5]
    ref_ids = greedy(lambda x: hf_logits(hf, x), prompt)
    assert torch.equal(greedy(lambda x: sf_logits(sf, x), prompt), ref_ids)
    assert torch.equal(greedy(lambda x: hf_logits(hf2, x), prompt), ref_ids)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_parity(side, tmp_path):
    hf, sf, hf2 = roundtrip("v3", tmp_path, rope_parameters=YARN)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, BASE["vocab_size"], (3, 16), generator=gen)
    mask = torch.ones_like(ids)
    for row, n_pad in enumerate((0, 5, 11)):
        if n_pad:
            if side == "left":
                mask[row, :n_pad] = 0
            else:
                mask[row, -n_pad:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    pos = positions_from_mask(mask)  # transformers' forward takes positions from the caller
    ref = hf_logits(hf, ids, mask, pos)
    ours = sf_logits(sf, ids, mask)
    back = hf_logits(hf2, ids, mask, pos)
    real = mask.bool()
    assert maxdiff(ref[real], ours[real]) <= TOL
    assert maxdiff(ours[real], back[real]) <= TOL
    # each padded row equals the same sequence run alone, unpadded
    for row in range(3):
        alone = ids[row][real[row]][None]
        assert maxdiff(sf_logits(sf, alone)[0], ours[row][real[row]]) <= TOL


def test_sharded_checkpoints_both_ways(tmp_path):
    hf = build_hf("v3", n_shared_experts=2)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    sf = SeekForCausalLM.from_pretrained(tmp_path / "hf")
    sf.save_pretrained(tmp_path / "sf", max_shard_size="50KB")
    assert len(list((tmp_path / "sf").glob("model-*.safetensors"))) > 1
    hf2 = hf_load_clean(tmp_path / "sf")
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    ref = hf_logits(hf, ids)
    assert maxdiff(ref, sf_logits(sf, ids)) <= TOL
    assert maxdiff(ref, hf_logits(hf2, ids)) <= TOL


def test_bf16_checkpoint_loads_in_transformers(tmp_path):
    """A bf16 save keeps the correction bias in fp32 (as DeepSeek-V3 ships it) and loads cleanly."""
    _, sf, _ = roundtrip("v3", tmp_path)
    sf.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    hf2 = hf_load_clean(tmp_path / "bf16")
    for name, b in hf2.named_buffers():
        if name.endswith("e_score_correction_bias"):
            assert b.dtype == torch.float32
    sf2 = SeekForCausalLM.from_pretrained(tmp_path / "bf16")
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    assert maxdiff(sf_logits(sf2, ids), hf_logits(hf2.float(), ids)) <= TOL


def test_stacked_expert_keys_load(tmp_path):
    """A directory with transformers' in-memory layout (stacked experts.gate_up_proj / down_proj) loads too."""
    from safetensors.torch import save_file

    hf = build_hf("v3")
    hf.config.save_pretrained(tmp_path / "stacked")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "stacked" / "model.safetensors"))
    sf = SeekForCausalLM.from_pretrained(tmp_path / "stacked")
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    assert maxdiff(hf_logits(hf, ids), sf_logits(sf, ids)) <= TOL


def test_fp8_checkpoint_gets_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    from seekformer.errors import CheckpointError

    _, sf, _ = roundtrip("v3", tmp_path)
    tensors = load_file(str(tmp_path / "sf" / "model.safetensors"))
    tensors["model.layers.0.self_attn.kv_b_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(tensors, str(tmp_path / "sf" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="FP8"):
        SeekForCausalLM.from_pretrained(tmp_path / "sf")

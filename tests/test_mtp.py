"""Multi-Token Prediction: the modules of DeepSeek-V3 sec. 2.2, their loss, and their place in checkpoints.

Depth k combines the previous depth's hidden state at position i with the embedding of token i+k and
predicts token i+k+1; the model loss is lm_loss + mtp_loss_weight * mean_k(loss_k) (+ balance terms).
On disk module k is layer num_hidden_layers + k, which transformers does not build (it reports those keys
as unexpected, and for DeepSeek-V3's 61 layers ignores them by name) and seekformer loads back.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from seekformer import SeekForCausalLM

from .conftest import tiny_config

transformers = pytest.importorskip("transformers")



def mtp_model(depths: int = 2, seed: int = 0, **overrides) -> SeekForCausalLM:
    cfg = tiny_config(num_nextn_predict_layers=depths, mtp_loss_weight=0.3, **overrides)
    model = SeekForCausalLM(cfg)
    model.reset_parameters(seed=seed)
    with torch.no_grad():  # non-trivial norms and bias, so a mix-up of weights would show
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        for _, moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05, generator=g)
    return model


def test_mtp_logits_and_loss_follow_the_paper():
    model = mtp_model(depths=2).train()
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    assert len(out.mtp_logits) == 2
    torch.testing.assert_close(out.loss, out.lm_loss + 0.3 * out.mtp_loss + out.aux_loss)

    # recompute depth by depth from the modules
    b, t = ids.shape
    h = model.model(ids)
    losses = []
    for k, module in enumerate(model.mtp, start=1):
        n = t - k
        pos = torch.arange(n).expand(b, n)
        cos, sin = model.model.rotary_emb(pos, h.dtype)
        h = module(h[:, :n], model.model.embed_tokens(ids[:, k:]), cos, sin)
        logits = model.lm_head(module.head_norm(h))  # [B, T-k, V]: position i predicts token i+k+1
        torch.testing.assert_close(logits, out.mtp_logits[k - 1])
        pred, target = logits[:, : t - k - 1], ids[:, k + 1:]
        losses.append(F.cross_entropy(pred.reshape(-1, cfg.vocab_size), target.reshape(-1)))
    torch.testing.assert_close(out.mtp_loss, torch.stack(losses).mean())

    # the MTP loss trains the MTP modules and the shared trunk, embedding and head
    model.zero_grad()
    out.mtp_loss.backward()
    for name in ("mtp.0.eh_proj.weight", "mtp.1.block.self_attn.kv_b_proj.weight", "model.embed_tokens.weight",
                 "lm_head.weight", "model.layers.0.self_attn.kv_b_proj.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name

    model.eval()
    assert model(ids, labels=ids).mtp_loss is None  # inference: no extra work


def test_mtp_is_causal_and_respects_padding():
    model = mtp_model(depths=1).train()
    ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, 8:] = 0
    a = model(ids, labels=ids).mtp_logits[0]
    b = model(changed, labels=changed).mtp_logits[0]
    # depth-1 position i sees tokens <= i+1: positions 0..6 are unchanged
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert (a[:, 7] - b[:, 7]).abs().max() > 1e-4

    # padded rows: the real positions get the same MTP logits as the sequence alone (left and right padding)
    for side in ("left", "right"):
        mask = torch.ones(2, 12, dtype=torch.long)
        if side == "left":
            mask[1, :4] = 0
        else:
            mask[1, 8:] = 0
        batch = ids.expand(2, 12).clone()
        if side == "left":
            batch[1, 4:] = ids[0, :8]
        batch = batch.masked_fill(mask == 0, 0)
        labels = batch.masked_fill(mask == 0, -100)
        out = model(batch, attention_mask=mask, labels=labels)
        assert torch.isfinite(out.mtp_loss)
        alone = model(ids[:, :8], labels=ids[:, :8]).mtp_logits[0]  # [1, 7, V]
        rows = out.mtp_logits[0][1, 4:11] if side == "left" else out.mtp_logits[0][1, :7]
        torch.testing.assert_close(rows, alone[0], rtol=1e-4, atol=1e-4)


def test_mtp_training_lowers_its_loss():
    torch.manual_seed(0)
    model = mtp_model(depths=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pattern = torch.arange(24) % 7 + 3
    ids = pattern.expand(4, 24).clone()
    first = None
    for _ in range(40):
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        first = first if first is not None else float(out.mtp_loss)
    assert float(out.mtp_loss) < 0.5 * first


def test_round_trip_bit_identical_with_mtp_and_deepseek_layout(tmp_path):
    model = mtp_model(depths=2, tie_word_embeddings=False).eval()
    cfg = model.config
    model.save_pretrained(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    layers = cfg.num_hidden_layers
    for k in range(2):
        p = f"model.layers.{layers + k}"
        for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                     "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight",
                     "mlp.gate.weight", "mlp.gate.e_score_correction_bias", "mlp.experts.0.gate_proj.weight",
                     f"mlp.experts.{cfg.n_routed_experts - 1}.down_proj.weight", "input_layernorm.weight"):
            assert f"{p}.{name}" in keys, f"{p}.{name}"
    assert not any(k.startswith("mtp.") for k in keys)

    loaded = SeekForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.config.num_nextn_predict_layers == 2
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]), k
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    model.train()
    loaded.train()
    a, b = model(ids, labels=ids), loaded(ids, labels=ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mtp_loss, b.mtp_loss)


def test_transformers_loads_the_directory_ignoring_mtp(tmp_path):
    model = mtp_model(depths=1).eval()
    model.save_pretrained(tmp_path / "m")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
    layers = model.config.num_hidden_layers
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    assert info["unexpected_keys"]
    assert all(k.startswith(f"model.layers.{layers}.") for k in info["unexpected_keys"])
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, model(ids).logits, rtol=0, atol=1e-4)

    # a directory re-saved by transformers has no MTP layers: seekformer loads the main model alone
    hf.save_pretrained(tmp_path / "hf")
    back = SeekForCausalLM.from_pretrained(tmp_path / "hf")
    assert back.config.num_nextn_predict_layers == 0 and len(back.mtp) == 0
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=1e-4)

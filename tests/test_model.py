"""Model shapes, causality, losses, and checkpoint round trips / failure modes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from seekformer import SeekConfig, SeekForCausalLM
from seekformer.errors import CheckpointError, ConfigError

from .conftest import tiny_config


def test_output_shapes_and_loss():
    cfg = tiny_config(num_nextn_predict_layers=1)
    model = SeekForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 17))
    out = model(ids)
    assert out.logits.shape == (3, 17, cfg.vocab_size)
    assert out.loss is None
    model.train()
    out = model(ids, labels=ids)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    # a random model is close to uniform: loss ~ ln(vocab)
    assert abs(out.lm_loss.item() - math.log(cfg.vocab_size)) < 0.5
    assert out.mtp_loss is not None and out.aux_loss is not None
    assert torch.allclose(out.loss, out.lm_loss + cfg.mtp_loss_weight * out.mtp_loss + out.aux_loss)
    out.loss.backward()
    assert model.mtp[0].eh_proj.weight.grad is not None


@torch.no_grad()
def test_causality_later_tokens_never_change_earlier_logits():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = SeekForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    base = model(ids).logits
    for j in (5, 12, 23):
        changed = ids.clone()
        changed[:, j:] = (changed[:, j:] + 7) % cfg.vocab_size
        out = model(changed).logits
        # equal up to float rounding (expert batches change size, so GEMM blocking may differ)
        assert (out[:, :j] - base[:, :j]).abs().max() < 1e-5, f"position < {j} changed"
        assert not torch.allclose(out[:, j:], base[:, j:])


def test_padding_mask_left_padded_rows_match_unpadded():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = SeekForCausalLM(cfg).eval()
    ids = torch.randint(3, cfg.vocab_size, (1, 10))
    alone = model(ids).logits
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    out = model(padded, attention_mask=mask).logits[:, 4:]
    assert (out - alone).abs().max() < 1e-5


def test_config_presets_and_errors():
    assert 4e6 < SeekConfig.from_preset("tiny").num_parameters() < 7e6
    assert 40e6 < SeekConfig.from_preset("small").num_parameters() < 60e6
    assert 400e6 < SeekConfig.from_preset("base").num_parameters() < 600e6
    big = SeekConfig.from_preset("deepseek-v3-671b")
    assert abs(big.num_parameters() / 1e9 - 671) < 1 and abs(big.num_parameters(active=True) / 1e9 - 37.5) < 1
    with pytest.raises(ConfigError):
        SeekConfig.from_preset("nope")
    with pytest.raises(ConfigError):
        tiny_config(n_routed_experts=6, n_group=4)
    with pytest.raises(ConfigError):
        tiny_config(num_experts_per_tok=9)


def test_round_trip_bit_identical(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(num_nextn_predict_layers=1, tie_word_embeddings=True)
    model = SeekForCausalLM(cfg).eval()
    for _, moe in model.moe_layers():
        moe.gate.e_score_correction_bias.normal_()
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model_type"] == "deepseek_v3" and saved["architectures"] == ["DeepseekV3ForCausalLM"]
    loaded = SeekForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_sharded_save_and_stale_shards_removed(tmp_path):
    cfg = tiny_config()
    model = SeekForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    shards = sorted((tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "m" / "model.safetensors.index.json").is_file()
    loaded = SeekForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    model.save_pretrained(tmp_path / "m")  # now a single file: the old shards must go
    assert not list((tmp_path / "m").glob("model-*.safetensors"))
    assert not (tmp_path / "m" / "model.safetensors.index.json").exists()
    SeekForCausalLM.from_pretrained(tmp_path / "m")


def test_missing_truncated_and_corrupt_checkpoints(tmp_path):
    cfg = tiny_config()
    SeekForCausalLM(cfg).save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="does not exist"):
        SeekForCausalLM.from_pretrained(tmp_path / "missing")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        SeekForCausalLM.from_pretrained(tmp_path / "m")
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError):
        SeekForCausalLM.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        SeekForCausalLM.from_pretrained(tmp_path / "m")
    # weights of another model under this config
    SeekForCausalLM(tiny_config(hidden_size=32, kv_lora_rank=16)).save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(CheckpointError, match="shape"):
        SeekForCausalLM.from_pretrained(tmp_path / "other")


def test_interrupted_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    import seekformer.checkpoint as ck

    cfg = tiny_config()
    first = SeekForCausalLM(cfg).eval()
    first.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    expected = first(ids).logits
    second = SeekForCausalLM(cfg)
    second.reset_parameters(seed=123)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # half a file, then the machine "dies"
            f.write(b"partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(tmp_path / "m")
    monkeypatch.undo()
    again = SeekForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(again(ids).logits, expected)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_overfit_tiny_text_far_below_unigram_entropy():
    """A few hundred steps on one short text drive the loss far below its unigram entropy."""
    torch.manual_seed(0)
    text = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
            "foolishness, it was the epoch of belief, it was the epoch of incredulity. ").encode()
    ids = torch.tensor([list(text)])
    counts = torch.bincount(ids[0], minlength=256).float()
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * p.log()).sum())
    cfg = tiny_config(num_hidden_layers=2)
    model = SeekForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(ids, labels=ids).lm_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * unigram_entropy, (loss.item(), unigram_entropy)

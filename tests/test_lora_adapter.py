"""`train.method: lora` writes a peft adapter (OUT/adapter) that transformers + peft apply to the base
directory with the same logits as seekformer's merged model; every intended module gets an adapter:
attention, dense MLP, shared experts and routed experts (peft's deepseek_v3 MoE target rewriting would
drop the dense and shared MLPs if they were named as target_modules)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from seekformer.checkpoint import save_model
from seekformer.models.causal_lm import SeekForCausalLM
from seekformer.models.multitask import SeekForMultiTask

from .conftest import tiny_config

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def expected_modules(cfg) -> set[str]:
    out = set()
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}"
        out |= {f"{pre}.self_attn.{n}" for n in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")}
        mlp = f"{pre}.mlp" if i < cfg.first_k_dense_replace else f"{pre}.mlp.shared_experts"
        out |= {f"{mlp}.{n}" for n in ("gate_proj", "up_proj", "down_proj")}
        if i >= cfg.first_k_dense_replace:
            out |= {f"{pre}.mlp.experts", f"{pre}.mlp.experts.base_layer"}  # down_proj, then gate_up_proj
    return out


def test_peft_adapter_applies_in_transformers_with_the_merged_logits(tmp_path):
    cfg = tiny_config(q_lora_rank=16)
    lm = SeekForCausalLM(cfg)
    lm.reset_parameters(seed=0)
    save_model(lm, tmp_path / "base")
    model = SeekForMultiTask(SeekForCausalLM.from_pretrained(tmp_path / "base"), [{"name": "g", "type": "generation"}])
    model.add_lora(r=4, alpha=8)
    adapted = {n.split(".lora_")[0] for n, _ in model.lm.named_parameters() if "lora_" in n}
    assert adapted == expected_modules(cfg)
    torch.manual_seed(1)
    for n, p in model.lm.named_parameters():
        if "lora_B" in n:  # peft starts B at zero: make every adapter matter
            p.data.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "out", extra_files={"recipe.yaml": f"base: {tmp_path / 'base'}\n"})
    adapter = tmp_path / "out" / "adapter"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["base_model_name_or_path"] == str(tmp_path / "base")
    assert (adapter / "adapter_model.safetensors").is_file()

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(hf, adapter).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    hf_adapted = {n.split(".lora_")[0].removeprefix("base_model.model.") for n, _ in pm.named_parameters()
                  if "lora_" in n}
    assert hf_adapted == expected_modules(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    merged = SeekForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        want, got = merged(x).logits, pm(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    with torch.no_grad(), pm.disable_adapter():
        assert not torch.allclose(pm(input_ids=x).logits, want, atol=1e-3)  # the adapters do change the model


def test_adapter_folds_into_a_served_model(tmp_path):
    """load_model_dir(BASE, adapter=DIR) -- what `seekformer serve BASE --lora NAME=DIR` serves -- equals the
    fine-tune's merged model; a directory without an adapter is a clear error."""
    from seekformer.errors import CheckpointError
    from seekformer.serving.server import load_model_dir
    from seekformer.tokenizer import SeekTokenizer

    cfg = tiny_config(vocab_size=300)
    tok = SeekTokenizer.train(texts=["the cat sat on the mat. " * 20], vocab_size=300, min_frequency=1)
    lm = SeekForCausalLM(cfg)
    lm.reset_parameters(seed=0)
    save_model(lm, tmp_path / "base", extra_files=tok.files())
    model = SeekForMultiTask(SeekForCausalLM.from_pretrained(tmp_path / "base"), [{"name": "g", "type": "generation"}])
    model.add_lora(r=4, alpha=8)
    torch.manual_seed(2)
    for n, p in model.lm.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "out", tokenizer=tok)
    served, _ = load_model_dir(tmp_path / "base", adapter=tmp_path / "out")
    x = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        assert torch.allclose(served(x).logits, SeekForCausalLM.from_pretrained(tmp_path / "out")(x).logits, atol=1e-5)
    with pytest.raises(CheckpointError, match="holds no peft adapter"):
        load_model_dir(tmp_path / "base", adapter=tmp_path / "base")

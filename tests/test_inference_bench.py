"""`seekformer bench decode` on a tiny model: rows, KV bytes, speculative row, markdown."""

from __future__ import annotations

import pytest
import torch

from .test_inference import tiny_model  # noqa: F401


def test_bench_decode_smoke(tmp_path):
    transformers = pytest.importorskip("transformers")
    from seekformer.bench.decode import bench_model, bench_speculative, kv_bytes_per_token, to_markdown

    model = tiny_model(num_nextn_predict_layers=1)
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    logs: list[str] = []
    rows = bench_model("t", model, hf, [1, 2], [8], new_tokens=4, repeats=1, log=logs.append)
    assert len(rows) == 2 and all(r["identical"] == 1.0 for r in rows)
    kv = kv_bytes_per_token(model, hf, torch.tensor([[5, 6, 7]]))
    cfg = model.config
    assert kv["seekformer"] == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert kv["transformers"] >= kv["seekformer"]  # transformers 5 caches the same latent (older: per-head K/V)
    spec = bench_speculative("t", model, torch.tensor([[5, 6, 7]]), 6, 1, logs.append, draft_counts=(None, 3))
    assert [r["drafts"] for r in spec] == [1, 3] and all(r["identical"] for r in spec)
    md = to_markdown({"rows": rows, "kv": {"t": kv}, "speculative": spec,
                      "settings": {"threads": 1, "dtype": "fp32", "repeats": 1, "new_tokens": 4, "machine": "m"}})
    assert md.count("| t |") == 5 and "speculative" in md.lower()


def test_bench_decode_against_llama_cpp(tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from seekformer.bench.decode import bench_llama_cpp, to_markdown
    from seekformer.models.causal_lm import SeekForCausalLM
    from seekformer.serving.demo import build_demo_model_dir

    d = build_demo_model_dir(tmp_path / "m")
    model = SeekForCausalLM.from_pretrained(d).eval()
    row = bench_llama_cpp("m", d, model, torch.tensor([[5, 6, 7, 8, 9]]), 8, 1, lambda _: None)
    assert row["sf_decode"] > 0 and row["llama_decode"] > 0
    assert row["same_tokens"] >= 0.5  # the same weights: greedy paths agree (fp32 rounding may split near-ties)
    md = to_markdown({"rows": [], "kv": {}, "speculative": [], "llama_cpp": [row],
                      "settings": {"threads": 1, "dtype": "fp32", "repeats": 1, "new_tokens": 8, "load": None}})
    assert "llama.cpp" in md and "| m | f32 |" in md


def test_bench_decode_compiled_rows_and_bandwidth(tmp_path, monkeypatch):
    """--compile adds the compiled step (traced eagerly here: torch.compile -> identity), interleaved; the
    bytes-per-token table counts K of E experts; --set parses KEY=INT."""
    transformers = pytest.importorskip("transformers")
    from seekformer.bench.decode import bench_model, bytes_per_token, to_markdown
    from seekformer.cli.bench import _int_overrides
    from seekformer.errors import ConfigError

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    model = tiny_model()
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    rows = bench_model("t", model, hf, [1], [8], new_tokens=4, repeats=1, log=lambda _: None, compile=True)
    assert rows[0]["identical_compiled"] == 1.0 and rows[0]["sfc_decode"] > 0
    need = bytes_per_token(model, 10)
    cfg = model.config
    assert need["cache"] == 10 * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    all_experts = sum(m.experts.gate_up_proj.numel() + m.experts.down_proj.numel() for _, m in model.moe_layers())
    assert need["weights"] < model.num_parameters() * 4 - all_experts * 4 * (1 - cfg.num_experts_per_tok / cfg.n_routed_experts) + 1
    bw = [{"model": "t", "prompt_len": 8, "bytes": need["total"], "weights": need["weights"], "cache": need["cache"],
           "bandwidth": 1e10, "ceiling": 1e10 / need["total"], "best": 1.0, "of_ceiling": need["total"] / 1e10}]
    md = to_markdown({"rows": rows, "kv": {}, "speculative": [], "bandwidth": bw,
                      "settings": {"threads": 1, "dtype": "fp32", "repeats": 1, "new_tokens": 4, "machine": "m",
                                   "compile": True}})
    assert "compiled / eager" in md and "ceiling tok/s" in md
    assert _int_overrides(["n_routed_experts=16", "num_experts_per_tok=4"]) == {"n_routed_experts": 16,
                                                                              "num_experts_per_tok": 4}
    with pytest.raises(ConfigError):
        _int_overrides(["nope=3"])

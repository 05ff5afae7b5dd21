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
    spec = bench_speculative("t", model, torch.tensor([[5, 6, 7]]), 6, 1, logs.append)
    assert spec["identical"]
    md = to_markdown({"rows": rows, "kv": {"t": kv}, "speculative": [spec],
                      "settings": {"threads": 1, "dtype": "fp32", "repeats": 1, "new_tokens": 4, "load": None}})
    assert md.count("| t |") == 4 and "speculative" in md.lower()

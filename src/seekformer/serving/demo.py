"""A tiny random model directory (weights + tokenizer) for tests, demos and benchmarks without a checkpoint.

    build_demo_model_dir(path)  # config.json, model.safetensors, tokenizer files: `seekformer serve path`

The tokenizer is trained in about a second on the first ~60 kB of the built-in corpus; the model is a
2-layer DeepSeek-V3 MoE (MLA, 1 shared + 4 routed experts) with random weights, so its text is noise, but
every code path (batching, stop strings, logprobs, chat template) runs as it would on a trained model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..checkpoint import save_model
from ..config import SeekConfig
from ..models.causal_lm import SeekForCausalLM
from ..tokenizer import SeekTokenizer


def demo_texts(max_chars: int = 60_000) -> list[str]:
    """Up to `max_chars` characters of real English from the built-in corpus (6 kB per document)."""
    from ..data.builtin import read_corpus_documents

    out, size = [], 0
    for doc in read_corpus_documents():
        out.append(doc[:6000])
        size += len(out[-1])
        if size >= max_chars:
            break
    return out


def demo_config(vocab_size: int, **overrides) -> SeekConfig:
    """A ~100k-parameter config (hidden 48, 2 layers, 4 routed experts, context 512)."""
    base = dict(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, moe_intermediate_size=32,
                num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=32, q_lora_rank=None,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
                max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                initializer_range=0.2)
    base.update(overrides)
    return SeekConfig(**base)


def build_demo_model_dir(path: str | os.PathLike, vocab_size: int = 512, seed: int = 0,
                         preset: str | None = None, **overrides) -> Path:
    """Write a random model and a freshly trained tokenizer to `path`; returns the path.

    `preset` ("tiny", "small", ...) builds that preset instead of the ~100k-parameter default (its
    vocabulary is resized to the tokenizer's).
    """
    tok = SeekTokenizer.train(demo_texts(), vocab_size=vocab_size)
    if preset is not None:
        cfg = SeekConfig.from_preset(preset, vocab_size=tok.vocab_size, **overrides)
    else:
        cfg = demo_config(tok.vocab_size, **overrides)
    tok.model_max_length = cfg.max_position_embeddings
    torch.manual_seed(seed)
    model = SeekForCausalLM(cfg)
    model.reset_parameters(seed=seed)
    save_model(model, path, extra_files=tok.files())
    return Path(path)

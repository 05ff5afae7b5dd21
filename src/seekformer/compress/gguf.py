"""`seekformer export gguf`: a model directory -> one GGUF file for llama.cpp (architecture `deepseek2`).

What llama.cpp's own converter (convert_hf_to_gguf.py, DeepseekV2Model) writes, done with the `gguf`
library from seekformer's tensors:
  * MLA as llama.cpp runs it: attention is MQA over the latent, so head_count_kv = 1, key_length =
    kv_lora_rank + qk_rope_head_dim, value_length = kv_lora_rank, and the per-head sizes go in
    key_length_mla / value_length_mla; kv_b_proj is split into `attn_k_b` [H, R, N] (transposed) and
    `attn_v_b` [H, V, R], the layout recent llama.cpp expects;
  * `q_lora_rank` is written as 0 when the model has a plain q_proj (the loader requires the key);
  * routed experts merged into [E, out, in] tensors (`ffn_{gate,up,down}_exps`), shared experts
    (`ffn_*_shexp`), router (`ffn_gate_inp`, fp32), e_score_correction_bias (`exp_probs_b`), sigmoid or
    softmax gating, group-limited routing (expert_group_count / _used_count), norm_topk_prob and
    routed_scaling_factor;
  * rope: llama.cpp rotates adjacent pairs (seekformer's `rope_interleave: true`); a model with the
    half-split layout has its q_pe / k_pe output rows permuted so the same scores come out;
  * the byte-level BPE tokenizer as `gpt2` with pre-tokenizer `gpt-2` (ours is the plain GPT-2 regex,
    which llama.cpp cannot recognise by hash), merges, special tokens and BOS/EOS/PAD ids;
  * MTP modules are not exported (llama.cpp's deepseek2 does not run them either).
Types: f32, f16 (matrices; norms, biases and the router stay f32) and q8_0 (matrices whose input width
is a multiple of 32, through gguf.quants).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .common import CompressError, check_out

TYPES = ("f32", "f16", "q8_0")


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - the compress extra installs it
        raise CompressError("GGUF export needs the `gguf` package: pip install 'seekformer[compress]'") from None
    return gguf


def _rope_perm(p: int) -> torch.Tensor:
    """Row order that turns the half-split rope layout [x_0..x_{P/2-1}, y_0..] into adjacent pairs."""
    half = p // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)


def model_tensors(model) -> dict[str, torch.Tensor]:
    """HF-named fp32 tensors of `model` as llama.cpp's deepseek2 wants them (before name mapping)."""
    from ..checkpoint import to_disk_state_dict

    cfg = model.config
    sd = {k: v.float() for k, v in to_disk_state_dict(model).items()
          if not _is_mtp(k, cfg.num_hidden_layers)}
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    h, n, p, v, r = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                     cfg.kv_lora_rank)
    perm = None if cfg.rope_interleave else _rope_perm(p)
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, t in sd.items():
        parts = key.split(".")
        if ".mlp.experts." in key:  # model.layers.L.mlp.experts.E.kind.weight
            experts.setdefault((int(parts[2]), parts[6]), {})[int(parts[5])] = t
            continue
        if key.endswith("kv_b_proj.weight"):
            kv_b = t.view(h, n + v, r)
            out[key.replace("kv_b_proj", "k_b_proj")] = kv_b[:, :n].transpose(1, 2).contiguous()  # [H,R,N]
            out[key.replace("kv_b_proj", "v_b_proj")] = kv_b[:, n:].contiguous()  # [H,V,R]
            continue
        if perm is not None and key.endswith(("q_proj.weight", "q_b_proj.weight")):
            q = t.view(h, n + p, -1).clone()
            q[:, n:] = q[:, n:][:, perm]
            t = q.view(h * (n + p), -1)
        if perm is not None and key.endswith("kv_a_proj_with_mqa.weight"):
            t = t.clone()
            t[r:] = t[r:][perm]
        if key.endswith("kv_a_proj_with_mqa.bias") and perm is not None:
            t = t.clone()
            t[r:] = t[r:][perm]
        if key.endswith("e_score_correction_bias"):
            key = key.replace("e_score_correction_bias", "e_score_correction.bias")
        out[key] = t
    for (layer, kind), per in experts.items():
        out[f"model.layers.{layer}.mlp.experts.{kind}.weight"] = torch.stack([per[e] for e in range(len(per))])
    return out


def _is_mtp(key: str, n_layers: int) -> bool:
    parts = key.split(".")
    return key.startswith("model.layers.") and int(parts[2]) >= n_layers


def _add_tokenizer(writer, gguf, model_dir: Path, cfg) -> None:
    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise CompressError(f"{model_dir} has no tokenizer.json; llama.cpp needs the tokenizer in the GGUF")
    tj = json.loads(tok_file.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or (tj.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise CompressError("only byte-level BPE tokenizers (seekformer's) can be exported to GGUF")
    vocab: dict[str, int] = dict(model["vocab"])
    special = {t["id"]: t["content"] for t in tj.get("added_tokens", [])}
    for i, content in special.items():
        vocab[content] = i
    size = max(cfg.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # the plain GPT-2 byte-level regex; llama.cpp cannot tell it by hash
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for setter, value in ((writer.add_bos_token_id, cfg.bos_token_id), (writer.add_eos_token_id, cfg.eos_token_id),
                          (writer.add_pad_token_id, cfg.pad_token_id)):
        if value is not None:
            setter(int(value))
    writer.add_add_bos_token(cfg.bos_token_id is not None)  # as `seekformer generate` (add_bos on)
    writer.add_add_eos_token(False)


def _add_hparams(writer, gguf, cfg, file_type: int) -> None:
    w = writer
    w.add_name("seekformer")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # MLA runs as MQA over the latent
    w.add_rope_freq_base(float(cfg.rope_parameters.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_q_lora_rank(cfg.q_lora_rank or 0)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    moe = cfg.n_routed_experts > 0 and cfg.first_k_dense_replace < cfg.num_hidden_layers
    w.add_leading_dense_block_count(cfg.first_k_dense_replace if moe else cfg.num_hidden_layers)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size if moe else cfg.intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts if moe else 0)
    if moe:
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_weights_scale(float(cfg.routed_scaling_factor))
        if cfg.norm_topk_prob and cfg.scoring_func == "sigmoid":
            w.add_expert_weights_norm(True)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                                 else gguf.ExpertGatingFuncType.SOFTMAX)
        # topk_group >= n_group keeps every group: no limit (llama.cpp asserts used < count, so leave it out)
        if (cfg.n_group or 1) > 1 and cfg.topk_method != "greedy" and (cfg.topk_group or 1) < cfg.n_group:
            w.add_expert_group_count(cfg.n_group)
            w.add_expert_group_used_count(cfg.topk_group)
    rp = cfg.rope_parameters
    if rp.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rp["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
        if rp.get("mscale_all_dim") is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * float(rp["mscale_all_dim"]))
    w.add_file_type(file_type)


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, out_type: str = "f16") -> Path:
    """Write `model_dir` as a GGUF file at `out` (atomically: a temporary file renamed into place)."""
    gguf = _gguf()
    from ..checkpoint import check_model_dir, load_config

    if out_type not in TYPES:
        raise CompressError(f"--type must be one of {', '.join(TYPES)}, got {out_type!r}")
    src = check_model_dir(model_dir)
    out = check_out(out, is_file=True)
    cfg = load_config(src)
    if cfg.quantization_config:
        raise CompressError(f"{src} is a seekformer-quantized model; export the float model (use --type q8_0 "
                            "for a quantized GGUF)")
    if cfg.model_type != "deepseek_v3" and cfg.topk_method == "group_limited_greedy":
        raise CompressError("llama.cpp's deepseek2 has no group_limited_greedy (V2 max-score groups) routing")
    from ..models.causal_lm import SeekForCausalLM

    model = SeekForCausalLM.from_pretrained(src)
    tensors = model_tensors(model)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, cfg.num_hidden_layers)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2])
        _add_hparams(writer, gguf, cfg, int(ftype))
        _add_tokenizer(writer, gguf, src, cfg)
        for key in sorted(tensors):
            name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise CompressError(f"no GGUF name for tensor {key}")
            data = tensors[key].numpy()
            keep_f32 = data.ndim == 1 or ".ffn_gate_inp." in name or ".exp_probs_b." in name
            if out_type == "f16" and not keep_f32:
                writer.add_tensor(name, data.astype(np.float16))
            elif out_type == "q8_0" and not keep_f32 and data.shape[-1] % 32 == 0:
                q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                writer.add_tensor(name, data.astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out

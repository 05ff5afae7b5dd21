"""`seekformer compress quantize`: weight-only int8 / int4 model directories that load like any other.

The quantized modules (nn/quant.py) replace every nn.Linear except `kv_b_proj` (applied per head in
absorbed form, see nn/mla_decode.py; ~0.5-2% of the weights), the grouped routed-expert weights, the
output head and the token embedding. The router stays in fp32 (tiny, and its top-K choice is the most
sensitive product of the model). config.json records the spec under `quantization_config`
(`quant_method: seekformer`); checkpoint.load_model rebuilds the quantized modules from it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..nn.quant import BITS, is_quantized, quant_spec, quantize_modules_
from .common import CompressError, check_out, load_with_tokenizer

DEFAULT_GROUP = 64  # measured: see docs/compress.md


def check_bits(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise CompressError(f"--bits must be 8 or 4, got {bits}")
    if bits == 4 and (group_size < 32 or group_size % 32):
        raise CompressError(f"--group-size must be a positive multiple of 32, got {group_size}")


@torch.no_grad()
def quantize_model(model, bits: int, group_size: int = DEFAULT_GROUP, embeddings: bool = True,
                   lm_head: bool = True):
    """Quantize `model` (a SeekForCausalLM) in place and record the spec in its config; returns it."""
    check_bits(bits, group_size)
    if is_quantized(model) or model.config.quantization_config:
        raise CompressError("the model is already quantized; quantize the original float model instead")
    spec = quant_spec(bits, group_size, embeddings=embeddings, lm_head=lm_head)
    if model.config.tie_word_embeddings:  # the head and the embedding become separate quantized tensors
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    quantize_modules_(model, spec)
    model.config.quantization_config = spec
    return model


def quantize_dir(model_dir: str | os.PathLike, out: str | os.PathLike, bits: int, group_size: int = DEFAULT_GROUP,
                 embeddings: bool = True, lm_head: bool = True) -> Path:
    """Read a float model directory, write its quantized copy to `out` (atomically, tokenizer included)."""
    from ..checkpoint import load_config, save_model

    check_bits(bits, group_size)
    out = check_out(out, model_dir)
    if load_config(model_dir).quantization_config:
        raise CompressError(f"{model_dir} is already quantized; quantize the original float model instead")
    model, tok, _ = load_with_tokenizer(model_dir)
    quantize_model(model, bits, group_size, embeddings, lm_head)
    save_model(model, out, extra_files=tok.files() if tok is not None else None)
    return out


def dir_size(path: str | os.PathLike) -> int:
    """Bytes of the weight files of a model directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))

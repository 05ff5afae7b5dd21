"""The one way to open a model directory for use: `load_model_and_tokenizer(dir, device, dtype)`, and for a
fine-tuned multi-task directory (task heads, perhaps a vision tower) `load_multitask(dir, device)`.

`generate`, `chat`, `eval`, `serve` and the benchmarks all load through it, so every command accepts the
same devices and the same dtype names: `fp32|float32`, `bf16|bfloat16`, `fp16|float16` (`parse_dtype`).
"""

from __future__ import annotations

import os

import torch

from ..errors import CheckpointError, ConfigError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
DTYPE_HELP = "fp32|float32 (default), bf16|bfloat16 or fp16|float16"


def parse_dtype(name: str | torch.dtype | None, allowed: tuple[str, ...] | None = None) -> torch.dtype | None:
    """A dtype name of any spelling in DTYPES (or a torch.dtype, or None) -> torch.dtype (None stays None).

    `allowed` limits the accepted short names (e.g. ("fp32", "bf16") for training autocast); ConfigError
    names what is accepted."""
    if name is None or isinstance(name, torch.dtype):
        return name
    dtype = DTYPES.get(str(name).lower())
    ok = [k for k, v in DTYPES.items() if allowed is None or any(DTYPES[a] == v for a in allowed)]
    if dtype is None or str(name).lower() not in ok:
        raise ConfigError(f"unknown dtype {name!r}: use {' | '.join(ok)}")
    return dtype


def short_dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16' (the names recipes and benchmark tables use)."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def check_device(device: str) -> str:
    """Validate a device string (cpu, cuda, cuda:N, mps) against what this machine has."""
    d = str(device)
    if d not in ("cpu", "mps") and not d.startswith("cuda"):
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available: use --device cpu")
    if d == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' requested but MPS is not available: use --device cpu")
    return d


def load_model_and_tokenizer(model_dir: str | os.PathLike, device: str = "cpu",
                             dtype: str | torch.dtype | None = None, require_tokenizer: bool = True):
    """(SeekForCausalLM in eval mode, SeekTokenizer) of a model directory saved with its tokenizer.

    Bad device/dtype names raise ConfigError, a missing or broken directory CheckpointError (also a
    missing tokenizer, unless `require_tokenizer=False`: then the tokenizer is None)."""
    from ..checkpoint import check_model_dir
    from ..tokenizer import TOKENIZER_FILE, SeekTokenizer
    from .causal_lm import SeekForCausalLM

    torch_dtype = parse_dtype(dtype)
    check_device(device)
    path = check_model_dir(model_dir)
    has_tokenizer = (path / TOKENIZER_FILE).is_file()
    if not has_tokenizer and require_tokenizer:
        raise CheckpointError(f"{path} has no {TOKENIZER_FILE}: use a directory saved with its tokenizer "
                              "(a training run's output, or save_model(..., extra_files=tokenizer.files()))")
    tokenizer = SeekTokenizer.load(path) if has_tokenizer else None
    model = SeekForCausalLM.from_pretrained(path, device=device, dtype=torch_dtype)
    return model.eval(), tokenizer


def load_multitask(model_dir: str | os.PathLike, device: str = "cpu"):
    """A directory written by `seekformer finetune`: SeekForVisionMultiTask when it has a vision tower, else
    SeekForMultiTask (CheckpointError when it is not a fine-tuned multi-task model)."""
    from .multitask import SeekForMultiTask
    from .vision_lm import SeekForVisionMultiTask, is_vision_dir

    check_device(device)
    kind = SeekForVisionMultiTask if is_vision_dir(model_dir) else SeekForMultiTask
    return kind.from_pretrained(model_dir, device=device)

"""seekformer: pretrain, fine-tune, evaluate, compress and serve DeepSeek-style MoE Transformers.

    from seekformer import SeekConfig, SeekForCausalLM
    model = SeekForCausalLM(SeekConfig.from_preset("tiny"))
    model.save_pretrained("out")            # a Hugging Face model directory (model_type deepseek_v3)
    model = SeekForCausalLM.from_pretrained("out")

Names are imported lazily, so `seekformer --help` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# How long idle OpenMP threads spin before they sleep. libgomp's default (300k spins, ~ms) collapses
# throughput when another process competes for the cores (a 2-thread training step ran 10x slower);
# never spinning (OMP_WAIT_POLICY=PASSIVE) pays a thread wake-up for every parallel op instead (~25% of a
# training step and ~30% of a small model's decoding step on an idle 2-core VM). A short spin keeps
# most of both (measured in README, Design notes). Takes effect only if seekformer is imported before
# torch (the CLI always is); an explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
# `seekformer serve` switches to PASSIVE instead (runtime.prefer_passive_openmp): its event-loop thread
# competes with spinning workers.
_OPENMP_DEFAULTED = "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
if _OPENMP_DEFAULTED:
    os.environ["GOMP_SPINCOUNT"] = "1000"

__version__ = "0.1.0"

_EXPORTS = {
    "PRESETS": "seekformer.config",
    "SeekConfig": "seekformer.config",
    "SeekformerError": "seekformer.errors",
    "SeekForCausalLM": "seekformer.models.causal_lm",
    "CausalLMOutput": "seekformer.models.causal_lm",
    "SeekForMultiTask": "seekformer.models.multitask",
    "SeekTokenizer": "seekformer.tokenizer",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'seekformer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

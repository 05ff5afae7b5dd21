"""seekformer: pretrain, fine-tune, evaluate, compress and serve DeepSeek-style MoE Transformers.

    from seekformer import SeekConfig, SeekForCausalLM
    model = SeekForCausalLM(SeekConfig.from_preset("tiny"))
    model.save_pretrained("out")            # a Hugging Face model directory (model_type deepseek_v3)
    model = SeekForCausalLM.from_pretrained("out")

Names are imported lazily, so `seekformer --help` does not pay for importing torch. Importing seekformer
changes nothing in the process (the CLI sets its OpenMP defaults at start-up: seekformer.runtime).
"""

from __future__ import annotations

import importlib
from typing import Any

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

"""seekformer: pretrain, fine-tune, evaluate, compress and serve DeepSeek-style MoE Transformers.

    from seekformer import SeekConfig, SeekForCausalLM
    model = SeekForCausalLM(SeekConfig.from_preset("tiny"))
    model.save_pretrained("out")            # a Hugging Face model directory (model_type deepseek_v3)
    model = SeekForCausalLM.from_pretrained("out")
"""

from .config import PRESETS, SeekConfig
from .errors import SeekformerError
from .models.causal_lm import CausalLMOutput, SeekForCausalLM

__version__ = "0.1.0"
__all__ = ["PRESETS", "SeekConfig", "SeekForCausalLM", "CausalLMOutput", "SeekformerError", "__version__"]

"""Models: the causal LM (+ MTP) and the multi-task model built on its trunk."""

from .causal_lm import CausalLMOutput, SeekForCausalLM, SeekModel

__all__ = ["CausalLMOutput", "SeekForCausalLM", "SeekModel"]

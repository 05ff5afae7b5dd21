"""Inference: latent KV cache decoding, sampling, beam search, MTP speculative decoding, batched engine."""

from .generate import GenerateOutput, generate, generate_text, stream
from .sampling import SamplingParams

__all__ = ["GenerateOutput", "SamplingParams", "generate", "generate_text", "stream"]

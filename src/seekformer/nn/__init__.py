"""Building blocks in pure torch (no I/O): RMSNorm, RoPE, MLA, DeepSeekMoE, SwiGLU, decoder block, KV cache."""

from .attention import MLA
from .block import DecoderLayer
from .kv_cache import KVCache
from .mlp import MLP
from .moe import MoE, Experts, Router, Routing, load_stats
from .norm import RMSNorm
from .rope import RotaryEmbedding, apply_rope, rope_frequencies

__all__ = ["MLA", "DecoderLayer", "KVCache", "MLP", "MoE", "Experts", "Router", "Routing", "load_stats", "RMSNorm",
           "RotaryEmbedding", "apply_rope", "rope_frequencies"]

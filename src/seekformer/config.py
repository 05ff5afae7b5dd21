"""SeekConfig: the model configuration, with the field names of Hugging Face `DeepseekV3Config`.

A `config.json` written by `SeekConfig.save` loads in `transformers.AutoConfig` (``model_type:
deepseek_v3``) and a DeepseekV3/V2 `config.json` from the hub loads here. Fields that only
seekformer reads (training-time balancing and MTP loss weights) are stored in the same file under
their own names; `transformers` keeps unknown keys as plain attributes and ignores them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
# config.json model_type of a `seekformer compress quantize` output (the float type is in base_model_type)
QUANTIZED_MODEL_TYPE = "seekformer_quantized"


@dataclass
class SeekConfig:
    """DeepSeek-V3 (or V2) architecture. Defaults are DeepSeek-V3's, as in `DeepseekV3Config`.

    Keys:
        vocab_size: vocabulary size (a recipe takes it from the tokenizer unless set)
        hidden_size: width of the residual stream
        intermediate_size: hidden width of the dense MLP layers
        moe_intermediate_size: hidden width of each expert
        num_hidden_layers: Transformer layers
        num_attention_heads: attention heads
        num_key_value_heads: kept for transformers compatibility (MLA has no KV-head grouping; null: heads)
        n_shared_experts: always-on experts per MoE layer
        n_routed_experts: routed (fine-grained) experts per MoE layer (0: a dense model)
        routed_scaling_factor: scale of the routed experts' combined output
        kv_lora_rank: MLA: rank of the compressed key/value latent (what the KV cache stores)
        q_lora_rank: MLA: rank of the query compression (null: a plain q_proj)
        qk_rope_head_dim: MLA: per-head query/key dimensions that get RoPE
        v_head_dim: MLA: per-head value dimension
        qk_nope_head_dim: MLA: per-head query/key dimensions without RoPE
        n_group: expert groups for group-limited routing
        topk_group: groups a token may route to
        num_experts_per_tok: routed experts per token (top-k)
        first_k_dense_replace: the first k layers use a dense MLP instead of MoE
        norm_topk_prob: renormalise the chosen experts' weights to sum to 1
        scoring_func: router scores: sigmoid (V3) | softmax (V2)
        topk_method: noaux_tc (V3) | greedy | group_limited_greedy (V2)
        hidden_act: MLP activation (silu)
        max_position_embeddings: context length (a recipe sets at least train.seq_len + 1)
        initializer_range: std of the normal initialisation
        rms_norm_eps: RMSNorm epsilon
        pad_token_id: padding token id (a recipe takes it from the tokenizer)
        bos_token_id: begin-of-text token id (from the tokenizer)
        eos_token_id: end-of-text token id (from the tokenizer)
        tie_word_embeddings: share the input embedding and the output head
        rope_parameters: RoPE settings: {rope_type: default | yarn, rope_theta, factor, ...}
        rope_interleave: DeepSeek's interleaved RoPE layout
        attention_bias: biases in the attention projections
        attention_dropout: attention dropout
        num_nextn_predict_layers: Multi-Token Prediction modules (0: none)
        model_type: deepseek_v3 | deepseek_v2 (what config.json says)
        mtp_loss_weight: weight of the MTP loss (DeepSeek-V3: 0.3, later 0.1); may change on resume
        aux_free_bias_update_rate: gamma of auxiliary-loss-free balancing (0 disables); may change on resume
        seq_aux_loss_alpha: alpha of the sequence-wise balance loss (0 disables); may change on resume
        router_z_loss_coef: router z-loss weight (0 disables); may change on resume
        quantization_config: weight-only quantization of a `seekformer compress quantize` output (nn/quant.py);
            null = float weights. Written by the quantize command, not set in recipes
    """

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"  # "softmax" for DeepSeek-V2
    topk_method: str = "noaux_tc"  # V2: "greedy" | "group_limited_greedy"
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    tie_word_embeddings: bool = False
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    num_nextn_predict_layers: int = 0
    model_type: str = "deepseek_v3"
    # --- seekformer training extras (ignored by transformers) ---
    mtp_loss_weight: float = 0.3  # lambda of the MTP loss (DeepSeek-V3: 0.3, then 0.1)
    aux_free_bias_update_rate: float = 1e-3  # gamma of auxiliary-loss-free balancing (0 disables)
    seq_aux_loss_alpha: float = 1e-4  # alpha of the sequence-wise balance loss (0 disables)
    router_z_loss_coef: float = 0.0  # router z-loss (0 disables)
    # weight-only quantization of a `seekformer compress quantize` output (see nn/quant.py); None = float
    quantization_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.rope_parameters = dict(self.rope_parameters or {})
        self.rope_parameters.setdefault("rope_type", self.rope_parameters.pop("type", "default"))
        self.rope_parameters.setdefault("rope_theta", 10000.0)
        if self.rope_parameters["rope_type"] == "yarn":
            self.rope_parameters.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """Attention score scale: 1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)^2."""
        scale = self.qk_head_dim**-0.5
        rp = self.rope_parameters
        if rp.get("rope_type", "default") != "default" and rp.get("mscale_all_dim"):
            factor = rp.get("factor") or 1.0
            m = 0.1 * rp["mscale_all_dim"] * math.log(factor) + 1.0 if factor > 1 else 1.0
            scale = scale * m * m
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"config.{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.qk_rope_head_dim % 2 == 0, f"config.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        need(self.qk_nope_head_dim >= 0, "config.qk_nope_head_dim must be >= 0")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "config.q_lora_rank must be null or > 0")
        need(self.scoring_func in SCORING_FUNCS, f"config.scoring_func must be one of {SCORING_FUNCS}")
        need(self.topk_method in TOPK_METHODS, f"config.topk_method must be one of {TOPK_METHODS}")
        need(self.hidden_act == "silu", f"config.hidden_act must be 'silu', got {self.hidden_act!r}")
        need(self.num_nextn_predict_layers >= 0, "config.num_nextn_predict_layers must be >= 0")
        # transformers' DeepseekV3 always routes with sigmoid + noaux_tc, DeepseekV2 with softmax + (group) greedy
        if self.model_type == "deepseek_v3":
            need(self.scoring_func == "sigmoid" and self.topk_method == "noaux_tc",
                 "model_type deepseek_v3 routes with scoring_func 'sigmoid' and topk_method 'noaux_tc'; "
                 "use model_type deepseek_v2 for softmax / greedy routing")
        else:
            need(self.scoring_func == "softmax" and self.topk_method in ("greedy", "group_limited_greedy"),
                 "model_type deepseek_v2 routes with scoring_func 'softmax' and topk_method 'greedy' or "
                 "'group_limited_greedy'")
        if self.n_routed_experts > 0 and self.first_k_dense_replace < self.num_hidden_layers:
            e, g = self.n_routed_experts, self.n_group or 1
            need(1 <= self.num_experts_per_tok <= e,
                 f"config.num_experts_per_tok must be in [1, n_routed_experts={e}], got {self.num_experts_per_tok}")
            need(e % g == 0, f"config.n_routed_experts ({e}) must be divisible by n_group ({g})")
            need(1 <= (self.topk_group or 1) <= g, f"config.topk_group must be in [1, n_group={g}]")
            if self.topk_method == "noaux_tc" and g > 1:
                need(e // g >= 2, "group-limited routing (noaux_tc) needs at least 2 experts per group")
            if g > 1 and self.topk_method != "greedy":
                need(self.num_experts_per_tok <= (self.topk_group or 1) * (e // g),
                     "config.num_experts_per_tok exceeds the experts available in topk_group groups")
        rt = self.rope_parameters.get("rope_type")
        need(rt in ("default", "yarn"), f"rope_parameters.rope_type must be 'default' or 'yarn', got {rt!r}")
        if rt == "yarn":
            need((self.rope_parameters.get("factor") or 0) > 0, "rope_parameters.factor must be > 0 for yarn")

    # ------------------------------------------------------------------ sizes
    def num_parameters(self, active: bool = False, include_embeddings: bool = True) -> int:
        """Parameter count (MTP modules excluded); `active=True` counts only the experts a token uses."""
        d = self.hidden_size
        h = self.num_attention_heads
        if self.q_lora_rank is None:
            attn = d * h * self.qk_head_dim
        else:
            attn = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
        attn += d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        attn += self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim) + h * self.v_head_dim * d
        total = 0
        for i in range(self.num_hidden_layers):
            total += attn + 2 * d
            if self.is_moe_layer(i):
                n = self.n_shared_experts + (self.num_experts_per_tok if active else self.n_routed_experts)
                total += n * 3 * d * self.moe_intermediate_size + self.n_routed_experts * d
            else:
                total += 3 * d * self.intermediate_size
        total += d
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return total

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["architectures"] = ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"]
        if out.get("quantization_config") is None:
            out.pop("quantization_config", None)  # transformers treats the key's presence as "quantized"
        else:  # transformers has no kernel for these weights and would load the model with random ones:
            out["base_model_type"], out["model_type"] = out["model_type"], QUANTIZED_MODEL_TYPE  # make it refuse
            out["architectures"] = ["SeekformerQuantizedForCausalLM"]
        out["qk_head_dim"] = self.qk_head_dim
        out["head_dim"] = self.qk_rope_head_dim
        out["torch_dtype"] = "float32"
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SeekConfig:
        """Build from a config.json dict (seekformer's or Hugging Face's DeepseekV3/V2); unknown keys are ignored."""
        d = dict(d)
        if d.get("model_type") == QUANTIZED_MODEL_TYPE:
            d["model_type"] = d.get("base_model_type", "deepseek_v3")
        mt = d.get("model_type", "deepseek_v3")
        if mt not in ("deepseek_v3", "deepseek_v2"):
            raise ConfigError(f"model_type {mt!r} is not supported (expected 'deepseek_v3' or 'deepseek_v2')")
        rp = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        if "rope_theta" in d and "rope_theta" not in rp:
            rp["rope_theta"] = d["rope_theta"]
        if "type" in rp and "rope_type" not in rp:
            rp["rope_type"] = rp.pop("type")
        d["rope_parameters"] = rp or None
        if mt == "deepseek_v2":
            d.setdefault("scoring_func", "softmax")
            d.setdefault("topk_method", "greedy")
            d.setdefault("norm_topk_prob", False)
            d.setdefault("routed_scaling_factor", 1.0)
            d.setdefault("first_k_dense_replace", 0)
            d.setdefault("n_group", None)
            d.setdefault("topk_group", None)
            d.setdefault("rope_interleave", True)
            d.setdefault("num_nextn_predict_layers", 0)
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0] if d["eos_token_id"] else None
        if d.get("n_group") is None:
            d["n_group"] = 1
        if d.get("topk_group") is None:
            d["topk_group"] = 1
        if d.get("v_head_dim") is None:
            d["v_head_dim"] = d.get("qk_nope_head_dim", 128)
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        try:
            return cls(**kwargs)
        except TypeError as e:  # pragma: no cover - defensive
            raise ConfigError(f"invalid config: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> SeekConfig:
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise ConfigError(f"no config.json at {p}: pass a model directory written by save_pretrained")
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p} is not valid JSON ({e}); the checkpoint may be truncated or corrupt") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{p} must hold a JSON object")
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> SeekConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SeekConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        d = dict(PRESETS[name])
        d.update(overrides)
        return cls(**d)


_SMALL_COMMON = dict(
    num_key_value_heads=None, q_lora_rank=None, n_group=4, topk_group=2, routed_scaling_factor=2.5,
    norm_topk_prob=True, bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-6,
    initializer_range=0.02, first_k_dense_replace=1, n_shared_experts=1,
)

PRESETS: dict[str, dict[str, Any]] = {
    # ~6M parameters (about 4.5M active per token): trains on a laptop CPU in minutes. 8 heads, so the
    # latent KV cache (64 + 16 numbers per token and layer) is 8x smaller than per-head K/V.
    "tiny": dict(
        _SMALL_COMMON, vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=8, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
    ),
    # ~50M parameters.
    "small": dict(
        _SMALL_COMMON, vocab_size=16384, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
        num_hidden_layers=8, num_attention_heads=8, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, n_routed_experts=8, num_experts_per_tok=2, max_position_embeddings=2048,
    ),
    # ~500M parameters.
    "base": dict(
        _SMALL_COMMON, vocab_size=32000, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512,
        num_hidden_layers=16, num_attention_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, num_experts_per_tok=4, max_position_embeddings=4096,
    ),
    # The published DeepSeek-V3 (671B total, 37B active). Config only: never instantiate it on a laptop.
    "deepseek-v3-671b": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
        n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
        v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
        first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=163840, bos_token_id=0,
        eos_token_id=1, num_nextn_predict_layers=1, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096},
    ),
}

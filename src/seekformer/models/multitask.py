"""SeekForMultiTask: one shared SeekForCausalLM trunk and one small head per task.

Shapes: B batch, T tokens, D hidden, C labels, V vocabulary.

    hidden_BTD = lm.model(input_ids_BT, attention_mask_BT)          shared, final-normed trunk states
    classification  logits_BC   = Linear(pool(hidden))                 pool: last non-pad token | mean
    tagging         logits_BTC  = Linear([h_t; h_t+1])                 one tag per word (its first sub-word)
    qa              logits_BT2  = Linear([h_t; h_t+1]) -> start, end   span over the context tokens
    generation      logits_BTV  = lm.lm_head(hidden)                   loss on the target tokens only

Inputs are right-padded. On disk a multi-task model is a normal Hugging Face model directory (the trunk,
loadable as DeepseekV3ForCausalLM) plus `heads.safetensors` (keys `<task>.<param>`) and `multitask.json`
(the task declarations and label lists). LoRA adapters (peft) are merged into the trunk when saving and
also written as a peft adapter in `adapter/`, which transformers + peft apply to the base directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .causal_lm import SeekForCausalLM, shifted_cross_entropy

HEADS_FILE = "heads.safetensors"
MULTITASK_FILE = "multitask.json"
ADAPTER_DIR = "adapter"  # train.method lora: the peft adapter (adapter_config.json, adapter_model.safetensors)
FORMAT_VERSION = 1
BAG_BUCKETS = 16384  # `features: ...+tokens`: vocabularies above this are hashed (id modulo) into this many buckets
DEFAULT_LORA_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                        "gate_proj", "up_proj", "down_proj")


@dataclass
class TaskOutput:
    """`loss` (task loss, scalar) when targets are given; `logits` as in the module docstring;
    `aux_loss` the MoE balance terms of this forward pass (training only)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class ClassificationHead(nn.Module):
    """hidden [B,T,n*D], mask [B,T] (and input_ids [B,T]) -> logits [B,C], pooled from the last non-pad token
    or the mean.

    `blocks` n > 1: the input is n depths' states side by side (`features: layers`: the embeddings and every
    decoder layer's output). `bag` W > 0 (`features: ...+tokens`): one more block, the text's bag of tokens:
    1 for each token id present among the real tokens (ids folded modulo W, so a large vocabulary is hashed
    into W buckets). With more than one block, each pooled block is RMS-normalised (no weights) and scaled by
    1/sqrt(blocks), so the pooled vector has the norm of one normed state whatever the blocks are.
    """

    def __init__(self, d: int, num_labels: int, pooling: str = "last", dropout: float = 0.0, blocks: int = 1,
                 bag: int = 0) -> None:
        super().__init__()
        self.pooling, self.blocks, self.bag = pooling, blocks, bag
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(blocks * d + bag, num_labels)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.classify(self.pool(hidden, mask, input_ids))

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B,T,n*D], mask [B,T] (input_ids [B,T] with a bag of tokens) -> pooled [B,n*D(+W)]."""
        if self.pooling == "mean":
            m = mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        else:
            last = mask.long().sum(1).clamp_min(1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        if self.blocks == 1 and not self.bag:
            return pooled
        parts = list(pooled.unflatten(-1, (self.blocks, -1)).unbind(1))
        if self.bag:
            if input_ids is None:
                raise ValueError("a classification head with a bag of tokens needs the input ids")
            parts.append(self.bag_of_tokens(input_ids, mask).to(pooled.dtype))
        k = len(parts) ** 0.5
        return torch.cat([p * torch.rsqrt(p.pow(2).mean(-1, keepdim=True) + 1e-6) / k for p in parts], -1)

    def bag_of_tokens(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """input_ids [B,T], mask [B,T] -> [B,W]: 1.0 where a bucket's token occurs among the real tokens."""
        idx = torch.where(mask.bool(), input_ids % self.bag, self.bag)  # padding goes to a spare bucket W
        out = torch.zeros(*input_ids.shape[:-1], self.bag + 1, device=input_ids.device)
        return out.scatter(-1, idx, torch.ones_like(idx, dtype=out.dtype))[..., : self.bag]

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [B,n*D(+W)] -> logits [B,C] (dropout, then the projection)."""
        return self.proj(self.dropout(pooled))


class TokenHead(nn.Module):
    """hidden [B,T,D] -> [B,T,C]: per-token tag logits (C tags) or span logits (C = 2: start, end).

    The trunk is causal, so token t has not seen what follows it. The head reads [h_t ; h_{t+1}] (one
    token of lookahead, zeros after the last position): a tag can depend on the next word, and a span end
    on the token after it (a comma, the end of the text). Encoders append EOS so the last word has a successor.
    """

    def __init__(self, d: int, num_outputs: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(2 * d, num_outputs)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        nxt = torch.cat([hidden[:, 1:], torch.zeros_like(hidden[:, :1])], dim=1)
        return self.proj(self.dropout(torch.cat([hidden, nxt], dim=-1)))


def feature_parts(features: str) -> tuple[str, bool]:
    """`features` of a classification task -> (trunk part: final | layers, whether a bag of tokens is added)."""
    trunk, _, extra = features.partition("+")
    return trunk, extra == "tokens"


def build_head(task: dict[str, Any], d: int, n_layers: int = 0, vocab: int = 0) -> nn.Module | None:
    """The head module a task declaration asks for (None for generation, which uses the LM head);
    `n_layers`: the trunk's decoder layers (a classification head with `features: layers` reads n_layers + 1
    depths); `vocab`: the vocabulary size (`features: ...+tokens` adds a bag of min(vocab, BAG_BUCKETS) tokens)."""
    kind, drop = task["type"], float(task.get("dropout", 0.0))
    if kind == "classification":
        trunk, tokens = feature_parts(task.get("features", "final"))
        blocks = n_layers + 1 if trunk == "layers" else 1
        return ClassificationHead(d, len(task["labels"]), task.get("pooling", "last"), drop, blocks,
                                  min(vocab, BAG_BUCKETS) if tokens else 0)
    if kind == "tagging":
        return TokenHead(d, len(task["labels"]), drop)
    if kind == "qa":
        return TokenHead(d, 2, drop)
    if kind in ("generation", "chat"):
        return None
    if kind == "image_classification":  # models/vision_lm.py: pooled after the image tokens
        return ClassificationHead(d, len(task["labels"]), task.get("pooling", "last"), drop)
    if kind == "vqa":  # answers come from the LM head
        return None
    from ..errors import TaskError

    raise TaskError(f"task {task.get('name')!r}: unknown type {kind!r}; use classification, tagging, qa, "
                    "generation or chat")


def best_spans(start_BT: torch.Tensor, end_BT: torch.Tensor, span_mask_BT: torch.Tensor,
               max_len: int) -> torch.Tensor:
    """argmax over start <= end < start + max_len (both inside the span mask) of start + end logits -> [B,2]."""
    b, t = start_BT.shape
    neg = torch.finfo(start_BT.dtype).min / 4
    s = start_BT.masked_fill(~span_mask_BT, neg)
    e = end_BT.masked_fill(~span_mask_BT, neg)
    score = s[:, :, None] + e[:, None, :]  # [B,T,T]
    idx = torch.arange(t, device=s.device)
    valid = (idx[None, :] >= idx[:, None]) & (idx[None, :] < idx[:, None] + max_len)
    flat = score.masked_fill(~valid[None], 2 * neg).view(b, -1).argmax(-1)
    return torch.stack([flat // t, flat % t], dim=-1)


class SeekForMultiTask(nn.Module):
    """A SeekForCausalLM trunk (`self.lm`) plus `self.heads[name]` for each task in `tasks`.

    `tasks` are task declarations (dicts with at least name, type, labels for classification/tagging,
    pooling, dropout); they are written to multitask.json as given.
    """

    def __init__(self, lm: SeekForCausalLM, tasks: list[dict[str, Any]]) -> None:
        super().__init__()
        self.lm = lm
        self.tasks = {t["name"]: dict(t) for t in tasks}
        self.heads = nn.ModuleDict()
        for t in tasks:
            head = build_head(t, lm.config.hidden_size, lm.config.num_hidden_layers, lm.config.vocab_size)
            if head is not None:
                self.heads[t["name"]] = head
        self.heads.to(lm.device)

    @property
    def config(self):
        return self.lm.config

    @property
    def device(self) -> torch.device:
        return self.lm.lm_head.weight.device

    def trunk_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters shared by all tasks (the trunk and LM head, MTP modules excluded)."""
        return [p for n, p in self.lm.named_parameters() if p.requires_grad and not n.startswith("mtp.")]

    def trunk_states(self, task: str, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """What `task`'s head reads: the final-normed trunk states [B,T,D]; for a classification task with
        `features: layers` (or `layers+tokens`), the embeddings and every decoder layer's output side by side
        [B,T,(L+1)D]."""
        if feature_parts(self.tasks[task].get("features", "final"))[0] != "layers":
            return self.lm.model(input_ids, mask)
        states: list[torch.Tensor] = []
        self.lm.model(input_ids, mask, layer_states=states)
        return torch.cat(states, dim=-1)

    def _aux_loss(self) -> torch.Tensor | None:
        """Collect (and clear) the MoE balance losses the last training forward left on the MoE layers."""
        aux = [m.aux_loss for _, m in self.lm.moe_layers() if m.aux_loss is not None]
        for _, m in self.lm.moe_layers():
            m.aux_loss = None
        return torch.stack(aux).sum() if aux else None

    def forward(self, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None, span_mask: torch.Tensor | None = None) -> TaskOutput:
        """Run `task` on input_ids [B,T]. Targets: labels [B] (classification), [B,T] (tagging and
        generation; -100 ignored; generation labels are the input ids, shifted inside), start/end
        positions [B] and span_mask [B,T] (qa)."""
        spec = self.tasks[task]
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        hidden = self.trunk_states(task, input_ids, mask)
        aux = self._aux_loss() if self.training else None
        kind, loss = spec["type"], None
        if kind in ("generation", "chat"):
            logits = self.lm.lm_head(hidden)
            if labels is not None:
                loss = shifted_cross_entropy(logits, labels)
        elif kind == "classification":
            logits = self.heads[task](hidden, mask, input_ids)
            if labels is not None:
                loss = F.cross_entropy(logits.float(), labels)
        elif kind == "tagging":
            logits = self.heads[task](hidden)
            if labels is not None:
                loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        else:  # qa
            logits = self.heads[task](hidden)
            if start_positions is not None:
                span = span_mask if span_mask is not None else mask.bool()
                neg = torch.finfo(torch.float32).min / 4
                s, e = (logits[..., i].float().masked_fill(~span, neg) for i in (0, 1))
                loss = (F.cross_entropy(s, start_positions) + F.cross_entropy(e, end_positions)) / 2
        return TaskOutput(logits=logits, loss=loss, aux_loss=aux)

    # ------------------------------------------------------------------ LoRA
    def add_lora(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 targets: list[str] | tuple[str, ...] = DEFAULT_LORA_TARGETS) -> int:
        """Freeze the trunk and inject LoRA adapters (peft) into the layers named in `targets`.

        Attention projections are adapted as Linear modules; gate_proj / up_proj / down_proj adapt every
        MLP: the dense ones and the shared experts (their weights) and the routed experts (their stacked
        `gate_up_proj` / `down_proj` tensors). Returns the number of trainable LoRA parameters.
        """
        try:
            from peft import inject_adapter_in_model
        except ImportError:
            from ..errors import RecipeError

            raise RecipeError("LoRA fine-tuning needs peft: pip install 'seekformer[lora]'") from None
        for p in self.lm.parameters():
            p.requires_grad_(False)
        cfg = lora_config(self.lm, r, alpha, dropout, targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                inject_adapter_in_model(cfg, self.lm.model)
            except ValueError as e:
                from ..errors import RecipeError

                if "dropout" in str(e):
                    raise RecipeError("lora.dropout must be 0 when LoRA adapts the MLPs or the routed experts (peft "
                                      "cannot apply dropout to adapted weight tensors): set lora.dropout 0, or "
                                      "leave gate_proj/up_proj/down_proj out of lora.targets") from None
                raise RecipeError(f"LoRA cannot be applied: {str(e).splitlines()[0]}") from None
        self.lora = cfg
        return sum(p.numel() for n, p in self.lm.named_parameters() if "lora_" in n and p.requires_grad)

    def adapter_files(self, base_model: str | None = None) -> dict[str, Any]:
        """{"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}: the LoRA adapters as a peft
        adapter that `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), DIR)` applies
        to the base model in transformers (same module paths, same logits as the merged trunk)."""
        from safetensors.torch import save as st_save

        state = {}
        for n, p in self.lm.named_parameters():
            if "lora_" in n and not n.startswith("mtp."):
                state["base_model.model." + n.replace(".default", "")] = p.detach().contiguous().cpu()
        cfg = self.lora.to_dict()
        for k, v in list(cfg.items()):
            if isinstance(v, set):
                cfg[k] = sorted(v)
        cfg.update(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model,
                   inference_mode=True)
        return {ADAPTER_DIR + "/adapter_config.json": json.dumps(cfg, indent=2, default=str) + "\n",
                ADAPTER_DIR + "/adapter_model.safetensors": st_save(state, metadata={"format": "pt"})}

    def has_lora(self) -> bool:
        return any("lora_" in n for n, _ in self.lm.named_parameters())

    @contextlib.contextmanager
    def merged_lora(self):
        """Temporarily fold the LoRA deltas into the base weights (e.g. for cached decoding, whose absorbed
        attention reads `kv_b_proj.weight` directly)."""
        layers = _lora_layers(self.lm)
        for _, m in layers:
            m.merge()
        try:
            yield self
        finally:
            for _, m in layers:
                m.unmerge()

    def merged_trunk(self) -> SeekForCausalLM:
        """A new plain SeekForCausalLM whose weights are the trunk's with the LoRA deltas folded in."""
        with self.merged_lora():
            sd = {re.sub(r"(\.base_layer)+\.", ".", k): v.detach().clone() for k, v in self.lm.state_dict().items()
                  if "lora_" not in k}
        lm = SeekForCausalLM(self.lm.config)
        lm.load_state_dict(sd)
        return lm.to(self.device)

    # ------------------------------------------------------------------ I/O
    def heads_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()}

    def save_pretrained(self, path: str | os.PathLike, tokenizer=None, extra_files: dict[str, Any] | None = None,
                        dtype: torch.dtype | None = None) -> None:
        """Atomically write the trunk (HF files, LoRA merged), heads.safetensors, multitask.json (+ tokenizer)."""
        from safetensors.torch import save as st_save

        from ..checkpoint import save_model

        lm = self.merged_trunk() if self.has_lora() else self.lm
        meta = {"format": FORMAT_VERSION, "tasks": list(self.tasks.values())}
        files: dict[str, Any] = dict(tokenizer.files()) if tokenizer is not None else {}
        files.update(extra_files or {})
        files[MULTITASK_FILE] = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
        files[HEADS_FILE] = st_save(self.heads_state(), metadata={"format": "pt"})
        if self.has_lora() and getattr(self, "lora", None) is not None:
            files.update(self.adapter_files(_recipe_base(files.get("recipe.yaml"))))
        save_model(lm, path, dtype=dtype, extra_files=files)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        text_only: bool = False) -> SeekForMultiTask:
        """Load a directory written by `save_pretrained` (CheckpointError when it is not a multi-task model):
        the language model and the task heads. A directory with a vision tower is refused unless `text_only`
        (then the tower is left out): `models.loading.load_multitask` opens either kind."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from ..checkpoint import check_model_dir, is_vision_dir
        from ..errors import CheckpointError

        if not text_only and is_vision_dir(path):
            raise CheckpointError(f"{path} has a vision tower: open it with "
                                  "seekformer.models.loading.load_multitask (or SeekForVisionMultiTask)")

        p = check_model_dir(path)
        meta_file, heads_file = p / MULTITASK_FILE, p / HEADS_FILE
        if not meta_file.is_file() or not heads_file.is_file():
            raise CheckpointError(f"{p} is not a fine-tuned multi-task model (no {MULTITASK_FILE} / {HEADS_FILE}); "
                                  "train one with `seekformer finetune`")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            tasks = meta["tasks"]
            state = load_file(str(heads_file))
        except (json.JSONDecodeError, KeyError, TypeError, SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read the task heads in {p} ({type(e).__name__}); the files are corrupt") \
                from None
        lm = SeekForCausalLM.from_pretrained(p, device=device)
        model = cls(lm, tasks)
        missing, unexpected = model.heads.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{heads_file} does not match {MULTITASK_FILE}: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")
        return model.to(device).eval()


ATTENTION_LORA_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_LORA_TARGETS = ("gate_proj", "up_proj", "down_proj")


def lora_config(lm: nn.Module, r: int, alpha: float, dropout: float, targets) -> Any:
    """The peft LoraConfig for `targets` on a SeekForCausalLM.

    peft >= 0.18 rewrites target_modules gate_proj/up_proj/down_proj of a deepseek_v3 model into its fused
    expert parameters and then drops them, so the dense MLPs and shared experts would get no adapter (in
    seekformer and again when transformers loads the adapter). MLP weights are therefore targeted as
    parameters (`gate_proj.weight`, ...; the routed experts' `experts.gate_up_proj` / `experts.down_proj`),
    which every peft version applies the same way.
    """
    from peft import LoraConfig

    from ..errors import RecipeError

    linear = {n.rsplit(".", 1)[-1] for n, m in lm.model.named_modules() if isinstance(m, nn.Linear)}
    params = {n for n, _ in lm.model.named_parameters()}
    modules = sorted(t for t in targets if t in linear and t not in MLP_LORA_TARGETS)
    weights = sorted(f"{t}.weight" for t in targets if t in MLP_LORA_TARGETS and t in linear)
    experts = set()
    if any(t in targets for t in ("gate_proj", "up_proj")) and any(n.endswith("experts.gate_up_proj") for n in params):
        experts.add("experts.gate_up_proj")
    if "down_proj" in targets and any(n.endswith("experts.down_proj") for n in params):
        experts.add("experts.down_proj")
    if not (modules or weights or experts):
        raise RecipeError(f"lora.targets {list(targets)} match no layer of the trunk "
                          f"(it has: {', '.join(sorted(linear))})")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules or None,
                      target_parameters=weights + sorted(experts) or None, bias="none")


def apply_adapter(lm: SeekForCausalLM, adapter_dir: str | os.PathLike) -> SeekForCausalLM:
    """`lm` with a peft LoRA adapter folded in: `adapter_dir` holds adapter_config.json and
    adapter_model.safetensors (a seekformer fine-tune's OUT/adapter, or OUT itself)."""
    from safetensors.torch import load_file

    from ..errors import CheckpointError

    d = Path(adapter_dir)
    if (d / ADAPTER_DIR / "adapter_config.json").is_file():
        d = d / ADAPTER_DIR
    if not (d / "adapter_config.json").is_file() or not (d / "adapter_model.safetensors").is_file():
        raise CheckpointError(f"{adapter_dir} holds no peft adapter (adapter_config.json + adapter_model.safetensors); "
                              "pass the adapter/ directory of a `train.method: lora` fine-tune")
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise CheckpointError("adapters need peft: pip install 'seekformer[lora]'") from None
    try:
        cfg = LoraConfig.from_pretrained(str(d))
        state = load_file(str(d / "adapter_model.safetensors"))
    except Exception as e:  # noqa: BLE001 - peft / safetensors raise many types for a corrupt file
        raise CheckpointError(f"cannot read the adapter in {d} ({type(e).__name__}: {e})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject_adapter_in_model(cfg, lm.model)
    ours = {n for n, _ in lm.named_parameters() if "lora_" in n}
    mapped = {re.sub(r"\.(lora_[AB])\.", r".\1.default.", k.removeprefix("base_model.model.")): v for k, v in state.items()}
    missing, unexpected = ours - set(mapped), set(mapped) - ours
    if missing or unexpected:
        raise CheckpointError(f"the adapter in {d} does not fit this model: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
    lm.load_state_dict(mapped, strict=False)
    return SeekForMultiTask(lm, []).merged_trunk().eval()


def _recipe_base(recipe_yaml: Any) -> str | None:
    """The `base` of a fine-tuning recipe's YAML text (None when absent)."""
    import yaml

    try:
        data = yaml.safe_load(recipe_yaml) if isinstance(recipe_yaml, str) else None
    except yaml.YAMLError:
        return None
    return str(data["base"]) if isinstance(data, dict) and data.get("base") else None


def _lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]


def is_multitask_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MULTITASK_FILE).is_file()


__all__ = ["SeekForMultiTask", "TaskOutput", "ClassificationHead", "TokenHead", "build_head", "best_spans",
           "HEADS_FILE", "MULTITASK_FILE", "DEFAULT_LORA_TARGETS", "is_multitask_dir"]

"""Recipes: YAML files that map 1:1 onto dataclasses, with `--section.key value` overrides.

    model:     {preset: tiny, <any SeekConfig field>: value}
    tokenizer: {path: null, vocab_size: 4096}
    data:      {sources: [builtin], text_key: text, val_fraction: 0.02}
    train:     {out: runs/x, steps: 1000, lr: 3e-3, ...}

Unknown keys and values of the wrong type raise RecipeError naming the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..config import PRESETS, SeekConfig
from ..distributed.config import ParallelRecipe
from ..errors import ConfigError, RecipeError
from .privacy.recipe import PrivacyRecipe


@dataclass
class TokenizerRecipe:
    """`tokenizer:` the byte-level BPE tokenizer.

    Keys:
        path: an existing tokenizer (or model) directory to use; null trains one on the data
        vocab_size: vocabulary size of a trained tokenizer (special tokens and the 256 bytes included)
        min_frequency: a merge must occur this often in the training text
        max_train_docs: train the tokenizer on at most this many documents (null: all)
    """

    path: str | None = None
    vocab_size: int = 4096
    min_frequency: int = 2
    max_train_docs: int | None = None


@dataclass
class DataRecipe:
    """`data:` the pretraining text.

    Keys:
        sources: text files, folders, .gz or .jsonl files, `builtin` (the shipped corpus) or `hf:NAME[:CONFIG[:SPLIT]]`
        text_key: the field that holds the text in .jsonl and Hugging Face records
        val_fraction: fraction of documents held out for validation
        cache_dir: where token shards go (null: OUT/data); shards are reused when sources and tokenizer match
    """

    sources: list[str] = field(default_factory=lambda: ["builtin"])
    text_key: str = "text"
    val_fraction: float = 0.02
    cache_dir: str | None = None


@dataclass
class TrainRecipe:
    """`train:` the pretraining loop.

    Keys:
        out: output directory: the model, checkpoints/, metrics.jsonl, tensorboard/, training.png
        seed: one seed for data order, initialisation and sampling
        seq_len: tokens per training sequence
        batch_size: sequences per micro-batch
        grad_accum: micro-batches per optimizer step
        steps: optimizer steps in all (may change on resume)
        max_minutes: stop early (evaluate and save) after this many minutes (null: no limit)
        lr: peak learning rate (AdamW)
        min_lr_ratio: the cosine schedule ends at lr * min_lr_ratio
        warmup_steps: linear warm-up steps
        weight_decay: AdamW weight decay (not on norms, biases and embeddings)
        beta1: AdamW beta1
        beta2: AdamW beta2
        eps: AdamW epsilon
        grad_clip: clip the gradient norm to this (0: no clipping)
        dtype: fp32|float32, or bf16|bfloat16 (autocast; weights stay fp32)
        device: cpu, cuda, cuda:N or mps
        threads: CPU threads for torch (null: torch's choice)
        eval_every: evaluate on the validation split every N steps (0: only at the end)
        eval_batches: validation batches per evaluation
        save_every: write OUT/checkpoints/step-N every N steps (and at the end, and on Ctrl-C)
        keep_checkpoints: how many of this run's newest checkpoints to keep
        log_every: write a metrics record every N steps
        progress: show a progress bar
        resume: continue from the newest checkpoint in OUT (it must come from the same recipe)
        overwrite: start afresh in an OUT that holds an earlier run's checkpoints (they are deleted)
    """

    out: str = "runs/pretrain"
    seed: int = 0
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 1000
    max_minutes: float | None = None
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "fp32"
    device: str = "cpu"
    threads: int | None = None
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    progress: bool = True
    resume: bool = False
    overwrite: bool = False


SECTIONS = {"tokenizer": TokenizerRecipe, "data": DataRecipe, "train": TrainRecipe, "parallel": ParallelRecipe}


@dataclass
class Recipe:
    """A pretraining recipe: `model`, `tokenizer`, `data`, `train`, `parallel` and (optional) `privacy` sections
    (docs/recipes.md lists every key)."""

    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})
    tokenizer: TokenizerRecipe = field(default_factory=TokenizerRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    parallel: ParallelRecipe = field(default_factory=ParallelRecipe)
    privacy: PrivacyRecipe | None = None  # DP-SGD pretraining (training/privacy/pretrain.py); None: not private

    # ------------------------------------------------------------------ model
    def model_config(self, vocab_size: int | None = None, special_ids: dict[str, int] | None = None) -> SeekConfig:
        """The SeekConfig: the preset, then the recipe's model fields, then the tokenizer's vocabulary."""
        m = dict(self.model)
        preset = m.pop("preset", None)
        base: dict[str, Any] = dict(PRESETS[preset]) if preset else {}
        base.update(m)
        if vocab_size is not None and "vocab_size" not in m:
            base["vocab_size"] = vocab_size
        for k, v in (special_ids or {}).items():
            if k not in m:
                base[k] = v
        base.setdefault("max_position_embeddings", max(1024, self.train.seq_len + 1))
        try:
            cfg = SeekConfig(**base)
        except ConfigError as e:
            raise RecipeError(f"model: {e}") from None
        if cfg.max_position_embeddings < self.train.seq_len + 1:
            raise RecipeError(f"train.seq_len {self.train.seq_len} needs model.max_position_embeddings >= "
                              f"{self.train.seq_len + 1} (it is {cfg.max_position_embeddings})")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain dicts and lists (what recipe.yaml holds)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved recipe as YAML."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ====================================================================== type checking
def type_name(tp: Any) -> str:
    """How an annotation reads in messages and docs: `int | None` -> 'an integer or null'."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (int -> float allowed); raise RecipeError if it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except RecipeError:
                continue
        raise RecipeError(f"{key} expects {type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, list):
            return [_coerce(v, typing.get_args(tp)[0], key) for v in value]
    elif origin is dict:
        if isinstance(value, dict):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is Any:
        return value
    raise RecipeError(f"{key} expects {type_name(tp)}, got {value!r}")


def build_section(cls: type, raw: Any, section: str) -> Any:
    """A section dataclass `cls` from its raw mapping; unknown keys and ill-typed values raise RecipeError naming
    `section.key`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe section '{section}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for k, v in raw.items():
        if k not in names:
            raise RecipeError(f"unknown recipe key '{section}.{k}'; valid keys: {', '.join(names)}")
        kwargs[k] = _coerce(v, hints[k], f"{section}.{k}")
    return cls(**kwargs)


def _check_model_section(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {"preset": "tiny"}
    if not isinstance(raw, dict):
        raise RecipeError("recipe section 'model' must be a mapping")
    hints = typing.get_type_hints(SeekConfig)
    out = {}
    for k, v in raw.items():
        if k == "preset":
            if v is not None and v not in PRESETS:
                raise RecipeError(f"model.preset {v!r} is unknown; choose one of: {', '.join(PRESETS)}")
            out[k] = v
            continue
        if k not in hints:
            raise RecipeError(f"unknown recipe key 'model.{k}'; use 'preset' or a SeekConfig field "
                              f"(e.g. hidden_size, num_hidden_layers, n_routed_experts)")
        out[k] = _coerce(v, hints[k], f"model.{k}")
    return out


# ====================================================================== loading
def recipe_from_dict(d: dict[str, Any]) -> Recipe:
    """Build a Recipe from a parsed YAML mapping (unknown sections or keys raise RecipeError)."""
    if not isinstance(d, dict):
        raise RecipeError("a recipe must be a YAML mapping with sections model/tokenizer/data/train")
    unknown = set(d) - {"model", "privacy", *SECTIONS}
    if unknown:
        raise RecipeError(f"unknown recipe section(s) {', '.join(sorted(unknown))}; "
                          f"valid: model, {', '.join(SECTIONS)}, privacy")
    privacy = build_section(PrivacyRecipe, d["privacy"], "privacy") if d.get("privacy") is not None else None
    return Recipe(model=_check_model_section(d.get("model")), privacy=privacy,
                  **{name: build_section(cls, d.get(name), name) for name, cls in SECTIONS.items()})


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped in seekformer/recipes (quickstart, tiny, small, ...)."""
    return sorted(p.name[:-5] for p in resources.files("seekformer.recipes").iterdir() if p.name.endswith(".yaml"))


def read_recipe_dict(path_or_name: str) -> dict[str, Any]:
    """Parse a recipe file, or a builtin recipe by name (e.g. 'quickstart')."""
    p = Path(path_or_name)
    if p.is_file():
        text = p.read_text()
    else:
        name = path_or_name[:-5] if path_or_name.endswith(".yaml") else path_or_name
        res = resources.files("seekformer.recipes") / f"{name}.yaml"
        if not res.is_file():
            raise RecipeError(f"recipe {path_or_name!r} not found: pass a YAML file or a builtin recipe "
                              f"({', '.join(builtin_recipes())})")
        text = res.read_text()
    try:
        d = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path_or_name} is not valid YAML: {str(e).splitlines()[0]}") from None
    return d


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--section.key value` / `--section.key=value` pairs (values parsed as YAML scalars)."""
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    i = 0
    while i < len(overrides):
        tok = overrides[i]
        if not tok.startswith("--"):
            raise RecipeError(f"unexpected argument {tok!r}; overrides look like --train.lr 3e-4")
        key = tok[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise RecipeError(f"override {tok} needs a value")
            raw = overrides[i + 1]
            i += 2
        if "." not in key:
            raise RecipeError(f"override --{key} must name a section and a key, e.g. --train.lr")
        section, name = key.split(".", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if d.get(section) is None:  # absent, or an optional section left null (privacy: null)
            d[section] = {}
        sec = d[section]
        if not isinstance(sec, dict):
            raise RecipeError(f"recipe section '{section}' must be a mapping")
        sec[name] = value
    return d


def load_recipe(path_or_name: str, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file or a builtin recipe by name, apply `--section.key value` overrides, check it."""
    return recipe_from_dict(apply_overrides(read_recipe_dict(path_or_name), overrides or []))

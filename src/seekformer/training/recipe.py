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


@dataclass
class TokenizerRecipe:
    path: str | None = None  # an existing tokenizer (or model) directory; None = train one on the data
    vocab_size: int = 4096
    min_frequency: int = 2
    max_train_docs: int | None = None  # cap the documents used to train the tokenizer


@dataclass
class DataRecipe:
    sources: list[str] = field(default_factory=lambda: ["builtin"])
    text_key: str = "text"
    val_fraction: float = 0.02
    cache_dir: str | None = None  # where token shards go; default OUT/data


@dataclass
class TrainRecipe:
    out: str = "runs/pretrain"
    seed: int = 0
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 1000
    max_minutes: float | None = None  # stop early (and save) when this much time has passed
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "cpu"
    threads: int | None = None
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    progress: bool = True
    resume: bool = False


SECTIONS = {"tokenizer": TokenizerRecipe, "data": DataRecipe, "train": TrainRecipe, "parallel": ParallelRecipe}


@dataclass
class Recipe:
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})
    tokenizer: TokenizerRecipe = field(default_factory=TokenizerRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    parallel: ParallelRecipe = field(default_factory=ParallelRecipe)

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
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ====================================================================== type checking
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
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
        raise RecipeError(f"{key} expects {_type_name(tp)}, got {value!r}")
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
    raise RecipeError(f"{key} expects {_type_name(tp)}, got {value!r}")


def _build_section(cls: type, raw: Any, section: str) -> Any:
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
    if not isinstance(d, dict):
        raise RecipeError("a recipe must be a YAML mapping with sections model/tokenizer/data/train")
    unknown = set(d) - {"model", *SECTIONS}
    if unknown:
        raise RecipeError(f"unknown recipe section(s) {', '.join(sorted(unknown))}; "
                          f"valid: model, {', '.join(SECTIONS)}")
    return Recipe(model=_check_model_section(d.get("model")),
                  **{name: _build_section(cls, d.get(name), name) for name, cls in SECTIONS.items()})


def builtin_recipes() -> list[str]:
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
        sec = d.setdefault(section, {})
        if not isinstance(sec, dict):
            raise RecipeError(f"recipe section '{section}' must be a mapping")
        sec[name] = value
    return d


def load_recipe(path_or_name: str, overrides: list[str] | None = None) -> Recipe:
    return recipe_from_dict(apply_overrides(read_recipe_dict(path_or_name), overrides or []))

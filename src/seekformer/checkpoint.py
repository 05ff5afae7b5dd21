"""Hugging Face-format checkpoints: safetensors with per-expert keys, sharding, atomic writes, trainer state.

A model directory holds `config.json` (model_type deepseek_v3), `model.safetensors` (or shards plus
`model.safetensors.index.json`), `generation_config.json` and, when saved by a trainer or with a
tokenizer, `tokenizer.json` + `tokenizer_config.json`. On disk, routed experts are per-expert keys
`model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight` and MTP module k is layer
`num_hidden_layers + k` (with copies of the shared embedding and head, as DeepSeek-V3 ships them).

Every write goes to a temporary file or directory first, is fsynced, then renamed into place: a crash
mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import fsio
from .config import SeekConfig
from .errors import CheckpointError, ConfigError
from .fsio import atomic_write_bytes, atomic_write_text  # noqa: F401 - re-exported for callers

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TRAINER_STATE_DIR = "trainer_state"

# stacked experts in memory; a quantized model (nn/quant.py) has `gate_up_proj_qweight` etc.
_EXPERTS_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)(?:_(qweight|scales|mins))?$")
_DISK_EXPERT_RE = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|qweight|scales|mins)$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# ====================================================================== atomic writes (seekformer.fsio)
WEIGHT_FILES = ("model*.safetensors", INDEX_FILE)  # replaced as a set: an old shard the new save lacks goes


# A model directory with a vision tower holds these next to the language model's files (models/vision_lm.py).
VISION_FILE = "vision.safetensors"
VISION_CONFIG_FILE = "vision.json"


def is_vision_dir(path: str | os.PathLike) -> bool:
    """Whether the model directory `path` has a vision tower (vision.json)."""
    return (Path(path) / VISION_CONFIG_FILE).is_file()


def atomic_directory(path: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """`fsio.atomic_directory` for a model directory: weight files a new save no longer has are removed."""
    return fsio.atomic_directory(path, stale=WEIGHT_FILES)


# ====================================================================== key mapping
def to_disk_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """In-memory state dict -> the `transformers` DeepseekV3 key layout (per-expert keys, MTP as layers)."""
    cfg: SeekConfig = model.config
    n_layers = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    sd = model.state_dict()

    def put(key: str, t: torch.Tensor) -> None:
        t = t.detach()
        if dtype is not None and t.is_floating_point() and not key.endswith("e_score_correction_bias"):
            t = t.to(dtype)
        out[key] = t.contiguous().clone() if t.data_ptr() in seen else t.contiguous()
        seen.add(out[key].data_ptr())

    seen: set[int] = set()
    for key, t in sd.items():
        if cfg.tie_word_embeddings and key == "lm_head.weight":
            continue
        if cfg.model_type == "deepseek_v2" and key.endswith("e_score_correction_bias"):
            continue  # DeepSeek-V2 routers have no correction bias
        if key.startswith("mtp."):
            _, k, rest = key.split(".", 2)
            prefix = f"model.layers.{n_layers + int(k)}"
            rest = rest[len("block."):] if rest.startswith("block.") else rest
            key = f"{prefix}.{rest}"
        m = _EXPERTS_RE.match(key)
        if m:
            base, kind, part = m.groups()
            part = part or "weight"
            for e in range(t.shape[0]):
                if kind == "gate_up_proj":
                    f = t.shape[1] // 2
                    put(f"{base}.{e}.gate_proj.{part}", t[e, :f])
                    put(f"{base}.{e}.up_proj.{part}", t[e, f:])
                else:
                    put(f"{base}.{e}.down_proj.{part}", t[e])
            continue
        put(key, t)
    d = cfg.hidden_size
    for i in range(n_layers + cfg.num_nextn_predict_layers):
        if cfg.is_moe_layer(i) and cfg.n_shared_experts == 0:  # transformers builds zero-width shared experts
            for name, shape in (("gate_proj", (0, d)), ("up_proj", (0, d)), ("down_proj", (d, 0))):
                out[f"model.layers.{i}.mlp.shared_experts.{name}.weight"] = torch.zeros(shape, dtype=dtype or model.dtype)
    for k in range(cfg.num_nextn_predict_layers if "lm_head.weight" in sd else 0):
        # DeepSeek-V3's MTP layers carry copies of the shared weights (not in quantized models)
        prefix = f"model.layers.{n_layers + k}"
        put(f"{prefix}.embed_tokens.weight", sd["model.embed_tokens.weight"])
        put(f"{prefix}.shared_head.head.weight", sd["lm_head.weight"])
    return out


def from_disk_state_dict(tensors: dict[str, torch.Tensor], cfg: SeekConfig) -> dict[str, torch.Tensor]:
    """Inverse of `to_disk_state_dict`: stacks per-expert keys and maps MTP layers to `mtp.K.*`."""
    n_layers = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = _LAYER_RE.match(key)
        is_mtp = bool(m) and int(m.group(1)) >= n_layers
        if is_mtp:
            k, rest = int(m.group(1)) - n_layers, m.group(2)
            if k >= cfg.num_nextn_predict_layers or rest in ("embed_tokens.weight", "shared_head.head.weight"):
                continue
        if ".shared_experts." in key and t.numel() == 0 and cfg.n_shared_experts == 0:
            continue
        e_match = _DISK_EXPERT_RE.match(key)
        if e_match:
            base, e, kind, part = e_match.groups()
            experts.setdefault((_layer_to_mtp_key(base, cfg), part), {}).setdefault(int(e), {})[kind] = t
            continue
        if is_mtp:
            if not rest.startswith(("enorm.", "hnorm.", "eh_proj.", "shared_head.")):
                rest = "block." + rest
            key = f"mtp.{k}.{rest}"
        out[key] = t
    for (base, part), per in experts.items():
        e_count = max(per) + 1
        missing = [e for e in range(e_count) if set(per.get(e, {})) != {"gate_proj", "up_proj", "down_proj"}]
        if missing:
            raise CheckpointError(f"checkpoint is missing weights of experts {missing[:5]} in {base}; it is truncated")
        suffix = "" if part == "weight" else f"_{part}"
        out[f"{base}.gate_up_proj{suffix}"] = torch.stack(
            [torch.cat([per[e]["gate_proj"], per[e]["up_proj"]], dim=0) for e in range(e_count)])
        out[f"{base}.down_proj{suffix}"] = torch.stack([per[e]["down_proj"] for e in range(e_count)])
    return out


def _layer_to_mtp_key(base: str, cfg: SeekConfig) -> str:
    m = _LAYER_RE.match(base)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        return f"mtp.{int(m.group(1)) - cfg.num_hidden_layers}.block.{m.group(2)}"
    return base


# ====================================================================== save
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ConfigError(f"cannot read the size {size!r}; write e.g. '2GB' or '500MB'")
    unit = (m.group(2) or "B").upper().replace("I", "")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[unit])


def write_weights(directory: Path, tensors: dict[str, torch.Tensor], max_shard_size: int | str = "2GB") -> None:
    """Write tensors as one safetensors file or as shards with an index, as `transformers` does."""
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        t = tensors[key]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE), metadata=meta)
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=meta)
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2, sort_keys=True))


def generation_config(cfg: SeekConfig, stop_token_ids: tuple[int, ...] = ()) -> dict[str, Any]:
    """generation_config.json: eos_token_id lists the config's eos and every end-of-turn token (so
    transformers and vLLM stop where seekformer does)."""
    eos = list(dict.fromkeys(i for i in ((cfg.eos_token_id,) + tuple(stop_token_ids)) if i is not None))
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": cfg.pad_token_id, "do_sample": False, "_from_model_config": True}


def _tokenizer_stop_ids(extra_files: dict[str, bytes | str]) -> tuple[int, ...]:
    """eos + end-of-turn ids of the tokenizer among `extra_files` (() without one)."""
    from .tokenizer import CONFIG_FILE, TOKENIZER_FILE, SeekTokenizer

    if TOKENIZER_FILE not in extra_files:
        return ()
    with tempfile.TemporaryDirectory() as d:
        for name in (TOKENIZER_FILE, CONFIG_FILE):
            if name in extra_files:
                data = extra_files[name]
                (Path(d) / name).write_bytes(data.encode() if isinstance(data, str) else data)
        return SeekTokenizer.load(d).stop_token_ids


def write_model_files(model: torch.nn.Module, directory: Path, max_shard_size: int | str = "2GB",
                      dtype: torch.dtype | None = None, extra_files: dict[str, bytes | str] | None = None,
                      card_dir: Path | None = None) -> None:
    """Write `model` (config, generation config, weights) and `extra_files` into an (empty, temporary) directory.

    A model card (README.md) is written unless `extra_files` has one: its metadata comes from a
    `recipe.yaml` among `extra_files` and the last values in `card_dir`/metrics.jsonl (default: none)."""
    from .model_card import CARD_FILE, flatten_metrics, model_card, read_last_metrics

    tensors = to_disk_state_dict(model, dtype)
    extra_files = dict(extra_files or {})
    stops = _tokenizer_stop_ids(extra_files)
    if CARD_FILE not in extra_files:
        recipe = extra_files.get("recipe.yaml")
        metrics = read_last_metrics(card_dir) if card_dir is not None else {}
        if isinstance(extra_files.get("results.json"), (str, bytes)):  # a fine-tune's final evaluation
            with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                metrics.update({k: v for k, v in flatten_metrics(json.loads(extra_files["results.json"])).items()
                                if k.startswith(("validation/", "test/")) and not k.endswith("/examples")})
        extra_files[CARD_FILE] = model_card(model.config, recipe.decode() if isinstance(recipe, bytes) else recipe,
                                            metrics)
    cfg_dict = model.config.to_dict()
    if dtype is not None:
        cfg_dict["torch_dtype"] = str(dtype).replace("torch.", "")
    (directory / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
    (directory / "generation_config.json").write_text(json.dumps(generation_config(model.config, stops), indent=2)
                                                       + "\n")
    for name, data in extra_files.items():
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.encode() if isinstance(data, str) else data)
    write_weights(directory, tensors, max_shard_size)


def save_model(model: torch.nn.Module, path: str | os.PathLike, max_shard_size: int | str = "2GB",
               dtype: torch.dtype | None = None, extra_files: dict[str, bytes | str] | None = None) -> None:
    """Atomically write `model` as a Hugging Face model directory (plus `extra_files`, e.g. a tokenizer)."""
    with atomic_directory(path) as tmp:
        write_model_files(model, tmp, max_shard_size, dtype, extra_files, card_dir=Path(path))


# ====================================================================== load
def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory (single file or the shards named by the index)."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is corrupt ({e}); re-save the checkpoint") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path} is incomplete: shard(s) {', '.join(missing[:3])} missing")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        return [single]
    others = sorted(path.glob("*.safetensors"))
    if others:
        return others
    raise CheckpointError(f"no model weights (*.safetensors) in {path}; is it a model directory?")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    tensors[key] = fh.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot read {f}: {str(e).splitlines()[0]}; the file is truncated or corrupt") \
                from None
    return tensors


_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.md", "*.txt", "*.model", "*.tiktoken"]


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A local directory as is; a Hugging Face hub id ("owner/name") that is not a local path is fetched
    (or found in the local cache when offline) with `huggingface_hub.snapshot_download`."""
    p = Path(path)
    if p.exists() or not _HUB_ID_RE.match(str(path)):
        return p
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{path} is not a local directory; to fetch it from the Hugging Face hub install "
                              "huggingface_hub (pip install 'seekformer[hf]')") from None
    try:
        return Path(snapshot_download(str(path), allow_patterns=HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated repo, network: one clear line
        kind = type(e).__name__
        hint = ("it is not in the local cache and the hub cannot be reached (offline?); download it where there "
                f"is network (`hf download {path}`) or pass a local directory") if "LocalEntryNotFound" in kind \
            or "Offline" in kind or "Connect" in kind else f"{kind}: {str(e).splitlines()[0] if str(e) else ''}"
        raise CheckpointError(f"model directory {path} does not exist locally and cannot be fetched from the "
                              f"Hugging Face hub: {hint}") from None


def check_model_dir(path: str | os.PathLike) -> Path:
    """The model directory `path` (a local directory, or a hub id: see resolve_model_dir), checked."""
    p = resolve_model_dir(path)
    if not p.exists():
        raise CheckpointError(f"model directory {p} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a directory; pass the model directory written by save_pretrained")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p} has no config.json; is it a model directory (from save_pretrained or training)?")
    return p


def load_config(path: str | os.PathLike) -> SeekConfig:
    p = check_model_dir(path)
    try:
        return SeekConfig.load(p / "config.json")
    except ConfigError as e:
        raise CheckpointError(f"{p}/config.json: {e}") from None


def load_model(cls, path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               config: SeekConfig | None = None):
    """Build `cls(config)` and fill it from the directory; missing or mis-shaped weights raise CheckpointError."""
    p = check_model_dir(path)
    cfg = config or load_config(p)
    tensors = read_tensors(p)
    if any(k.endswith("weight_scale_inv") for k in tensors):
        raise CheckpointError(f"{p} holds FP8 block-quantized weights (*.weight_scale_inv); convert it to bf16 "
                              "first (DeepSeek's fp8_cast_bf16.py) or use a bf16 copy of the model")
    if cfg.num_nextn_predict_layers:
        first_mtp = f"model.layers.{cfg.num_hidden_layers}."
        if not any(k.startswith(first_mtp) for k in tensors):  # e.g. saved by transformers, which drops MTP
            cfg = cfg.replace(num_nextn_predict_layers=0)
    sd = from_disk_state_dict(tensors, cfg)
    with torch.device("meta"):
        model = cls(cfg)
    if cfg.quantization_config:  # `seekformer compress quantize` output: quantized placeholders, then fill
        with torch.device("meta"):
            model.quantize_placeholders_(cfg.quantization_config)
    expected = model.state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    for k, t in expected.items():  # V2 checkpoints have no correction bias: start from zeros
        if k.endswith("e_score_correction_bias") and k not in sd and cfg.model_type == "deepseek_v2":
            sd[k] = torch.zeros(t.shape, dtype=torch.float32)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing:
        raise CheckpointError(f"{p} does not match its config: {len(missing)} weight(s) missing, e.g. "
                              f"{', '.join(missing[:3])}; the checkpoint is truncated or from another model")
    if unexpected:
        raise CheckpointError(f"{p} does not match its config: unexpected weight(s) {', '.join(unexpected[:3])}")
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{p}: weight {k} has shape {tuple(sd[k].shape)}, config expects {tuple(t.shape)}")
    target_dtype = dtype or torch.float32
    for k in sd:
        if k.endswith("e_score_correction_bias"):
            sd[k] = sd[k].float()
        elif sd[k].is_floating_point() and not (cfg.quantization_config and k.endswith(("scales", "mins"))):
            sd[k] = sd[k].to(target_dtype)
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # buffers that are not saved (rotary frequencies, load counters) are rebuilt on the real device
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg.qk_rope_head_dim, cfg.rope_parameters,
                                                         cfg.max_position_embeddings)
    for _, moe in model.moe_layers():
        moe.load_counts = torch.zeros(moe.num_experts, dtype=torch.float32)
    return model.to(device).eval()


# ====================================================================== trainer state
def save_trainer_state(directory: Path, state: dict[str, Any]) -> None:
    """Write optimizer/scheduler/step/RNG/data-position state under `directory/trainer_state/`."""
    d = directory / TRAINER_STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    torch.save(state, d / "state.pt")


def load_trainer_state(directory: Path) -> dict[str, Any]:
    f = Path(directory) / TRAINER_STATE_DIR / "state.pt"
    if not f.is_file():
        raise CheckpointError(f"no trainer state at {f}; cannot resume from {directory}")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"cannot read {f} ({type(e).__name__}); the trainer state is corrupt") from None

"""Vision-language models (DeepSeek-VL style): image tokens from a VisionTower in the MoE trunk's sequence.

Shapes: B rows, T tokens, D hidden, M image tokens per image, C channels, S image side.

    text  "<|user|><|image|>what color is the circle?<|end_of_turn|><|assistant|>"
    ids   [bos, user, IMG x M, what, color, ..., eot, assistant]      one `<|image|>` marker -> M placeholders
    x_BTD = embed_tokens(ids); x[ids == IMG] = VisionTower(pixels_BCSS)   (splice_image_tokens)
    hidden_BTD = lm.model(ids, mask, inputs_embeds=x_BTD)               the unchanged causal trunk

`SeekForVisionLM` (lm + vision tower) generates and chats; `SeekForVisionMultiTask` adds image tasks
(image_classification: a head on the last token; vqa: answers from the LM head) to the multi-task model.
On disk both are the usual model directory (the text part a Hugging Face DeepseekV3 model, loadable in
transformers as the LM; a multi-task model's heads.safetensors / multitask.json) plus `vision.safetensors`
(keys `encoder.*`, `projector.*`) and `vision.json` (the vision config section and the image token).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import VISION_CONFIG_FILE, VISION_FILE, is_vision_dir
from ..data.images import IMAGE_TOKEN
from ..nn.vision import VisionConfig, VisionTower, random_translate, splice_image_tokens
from .causal_lm import SeekForCausalLM
from .multitask import SeekForMultiTask, TaskOutput

IMAGE_TASK_TYPES = ("image_classification", "vqa")


# ====================================================================== tokens
def image_token_id(tokenizer) -> int | None:
    """The id of `<|image|>` in a SeekTokenizer (None when it has none)."""
    return tokenizer._tok.token_to_id(IMAGE_TOKEN)


def add_image_token(tokenizer) -> int:
    """Add `<|image|>` as a special token (no-op when present); returns its id."""
    tid = image_token_id(tokenizer)
    if tid is None:
        from tokenizers import AddedToken

        tokenizer._tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
        tokenizer._token_bytes = None
        tid = image_token_id(tokenizer)
    tokenizer.special_token_ids[IMAGE_TOKEN] = tid
    return tid


@torch.no_grad()
def grow_vocab(lm: SeekForCausalLM, vocab_size: int) -> None:
    """Give the embedding and LM head `vocab_size` rows (new embedding rows: the mean row; new head rows: 0)."""
    old = lm.config.vocab_size
    if vocab_size <= old:
        return
    emb = lm.model.embed_tokens
    new_emb = nn.Embedding(vocab_size, emb.embedding_dim, device=emb.weight.device, dtype=emb.weight.dtype)
    new_emb.weight[:old] = emb.weight
    new_emb.weight[old:] = emb.weight.mean(0)
    lm.model.embed_tokens = new_emb
    if lm.config.tie_word_embeddings:
        lm.lm_head.weight = new_emb.weight
    else:
        head = nn.Linear(lm.config.hidden_size, vocab_size, bias=False, device=emb.weight.device,
                         dtype=emb.weight.dtype)
        head.weight.zero_()
        head.weight[:old] = lm.lm_head.weight
        lm.lm_head = head
    lm.config.vocab_size = vocab_size


def expand_image_markers(ids: list[int], token_id: int, n: int) -> list[int]:
    """Each `<|image|>` id -> `n` placeholder ids (one per image token)."""
    out: list[int] = []
    for t in ids:
        out.extend([t] * n if t == token_id else [t])
    return out


# ====================================================================== I/O helpers
def read_vision_dir(path: str | os.PathLike) -> tuple[VisionConfig, int | None, dict[str, torch.Tensor]]:
    """(VisionConfig, image token id, tower state dict) of a model directory with vision files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..errors import CheckpointError, ConfigError

    p = Path(path)
    try:
        meta = json.loads((p / VISION_CONFIG_FILE).read_text(encoding="utf-8"))
        cfg = VisionConfig.from_dict(meta["vision"])
        state = load_file(str(p / VISION_FILE))
    except FileNotFoundError as e:
        raise CheckpointError(f"{p} has no vision model ({Path(e.filename).name} missing); train one with "
                              "`seekformer finetune` and image tasks") from None
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError, SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read the vision model in {p} ({type(e).__name__}: {e}); the files are "
                              "corrupt") from None
    return cfg, meta.get("image_token_id"), state


def vision_files(tower: VisionTower, token_id: int) -> dict[str, Any]:
    from safetensors.torch import save as st_save

    state = {k: v.detach().contiguous().cpu() for k, v in tower.state_dict().items()}
    meta = {"vision": tower.config.to_dict(), "image_token": IMAGE_TOKEN, "image_token_id": token_id,
            "num_image_tokens": tower.config.num_image_tokens}
    return {VISION_FILE: st_save(state, metadata={"format": "pt"}),
            VISION_CONFIG_FILE: json.dumps(meta, indent=2) + "\n"}


def load_tower_state(tower: VisionTower, state: dict[str, torch.Tensor], where: str, strict: bool = True) -> None:
    """Load weights into `tower`; with strict=False only the tensors whose shapes match (e.g. the encoder)."""
    from ..errors import CheckpointError

    if not strict:
        own = tower.state_dict()
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise CheckpointError(f"{where}: the vision weights do not match vision.json (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")


# ====================================================================== embedding
class ImageEmbedder:
    """Shared by both model classes: token ids + pixels -> inputs_embeds with image tokens spliced in.

    With `cache_features` (a frozen encoder, no augmentation) the encoder's output per image is cached,
    keyed by a hash of its pixels, so every epoch after the first skips the encoder.
    """

    lm: SeekForCausalLM
    vision: VisionTower
    image_token_id: int
    cache_features: bool = False

    def image_embeds(self, input_ids_BT: torch.Tensor, pixel_values_BCSS: torch.Tensor | None,
                     augment: int = 0) -> torch.Tensor:
        ids = input_ids_BT
        is_img = ids == self.image_token_id
        x = self.lm.model.embed_tokens(ids)
        if pixel_values_BCSS is None:
            if bool(is_img.any()):
                from ..errors import GenerationError

                raise GenerationError("the prompt has image placeholders but no image was given")
            return x
        pix = pixel_values_BCSS.to(x.device, torch.float32)
        if augment and self.vision.training:
            pix = random_translate(pix, augment)
        feats = self._encode(pix)
        return splice_image_tokens(x, is_img, self.vision.projector(feats))

    def _encode(self, pix: torch.Tensor) -> torch.Tensor:
        enc = self.vision.encoder
        frozen = not any(p.requires_grad for p in enc.parameters())
        if not (self.cache_features and frozen):
            return enc(pix)
        cache = self.__dict__.setdefault("_feature_cache", {})
        keys = [hashlib.blake2b(row.cpu().numpy().tobytes(), digest_size=16).digest() for row in pix]
        todo = [i for i, k in enumerate(keys) if k not in cache]
        if todo:
            with torch.no_grad():
                new = enc(pix[todo])
            for i, f in zip(todo, new):
                cache[keys[i]] = f
        return torch.stack([cache[k] for k in keys])


# ====================================================================== generation
class _ImagePrefill:
    """Wraps an LM for `inference.generate`: its first (prefill) call gets the image tokens spliced in.

    Every attribute is the LM's; only `__call__` with the prompt's ids adds `inputs_embeds`.
    """

    def __init__(self, owner: ImageEmbedder, pixel_values: torch.Tensor | None) -> None:
        self.__dict__["_owner"], self.__dict__["_pix"], self.__dict__["_done"] = owner, pixel_values, False

    def __getattr__(self, name: str):
        return getattr(self._owner.lm, name)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw):
        if not self._done and bool((input_ids == self._owner.image_token_id).any()):
            self.__dict__["_done"] = True
            kw["inputs_embeds"] = self._owner.image_embeds(input_ids, self._pix)
        return self._owner.lm(input_ids, attention_mask, **kw)


@contextlib.contextmanager
def image_prefill(owner: ImageEmbedder, pixel_values: torch.Tensor | None):
    """The LM as `generate()` sees it, with `pixel_values` [B',C,S,S] (images in prompt order) spliced in."""
    yield _ImagePrefill(owner, pixel_values)


# ====================================================================== models
class SeekForVisionLM(nn.Module, ImageEmbedder):
    """A SeekForCausalLM (`lm`) with a VisionTower (`vision`): `model(ids, mask, pixel_values, labels)`."""

    def __init__(self, lm: SeekForCausalLM, vision_config: VisionConfig, image_token_id: int) -> None:
        super().__init__()
        vision_config.lm_hidden_size = lm.config.hidden_size
        self.lm, self.vision, self.image_token_id = lm, VisionTower(vision_config).to(lm.device), int(image_token_id)

    @property
    def config(self):
        return self.lm.config

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @property
    def num_image_tokens(self) -> int:
        return self.vision.config.num_image_tokens

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kw):
        """input_ids [B,T] with M placeholders per image, pixel_values [B',C,S,S] -> CausalLMOutput."""
        embeds = self.image_embeds(input_ids, pixel_values)
        return self.lm(input_ids, attention_mask, labels=labels, inputs_embeds=embeds, **kw)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values: torch.Tensor | None = None, attention_mask=None, **kwargs):
        """`inference.generate.generate` with the images spliced into the prompt (see SeekForCausalLM.generate)."""
        from ..inference.generate import generate

        with image_prefill(self, pixel_values) as lm:
            return generate(lm, input_ids, attention_mask=attention_mask, **kwargs)

    def save_pretrained(self, path: str | os.PathLike, tokenizer=None, dtype: torch.dtype | None = None) -> None:
        from ..checkpoint import save_model

        files = dict(tokenizer.files()) if tokenizer is not None else {}
        files.update(vision_files(self.vision, self.image_token_id))
        save_model(self.lm, path, dtype=dtype, extra_files=files)

    @classmethod
    def around(cls, lm: SeekForCausalLM, path: str | os.PathLike) -> SeekForVisionLM:
        """The vision tower of model directory `path` around an already loaded `lm` (shared, e.g. by a server)."""
        cfg, tid, state = read_vision_dir(path)
        model = cls(lm, cfg, tid)
        load_tower_state(model.vision, state, str(path))
        model.vision.to(lm.dtype)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> SeekForVisionLM:
        """Load a directory with vision files (a vision fine-tune; multi-task heads are not needed)."""
        from ..checkpoint import check_model_dir

        p = check_model_dir(path)
        cfg, tid, state = read_vision_dir(p)
        lm = SeekForCausalLM.from_pretrained(p, device=device)
        model = cls(lm, cfg, tid)
        load_tower_state(model.vision, state, str(p))
        return model.to(device).eval()


class SeekForVisionMultiTask(SeekForMultiTask, ImageEmbedder):
    """SeekForMultiTask plus a VisionTower: text tasks as before; image tasks take `pixel_values` [B,C,S,S].

    image_classification  logits_BC  = ClassificationHead(hidden) (last token, after the image tokens)
    vqa                   logits_BTV = lm.lm_head(hidden), loss on the answer tokens (labels, -100 elsewhere);
                          with labels only the N answer-predicting positions are computed: logits_NV
    """

    def __init__(self, lm: SeekForCausalLM, tasks: list[dict[str, Any]], vision_config: VisionConfig,
                 image_token_id: int) -> None:
        super().__init__(lm, tasks)
        vision_config.lm_hidden_size = lm.config.hidden_size
        self.vision = VisionTower(vision_config).to(lm.device)
        self.image_token_id = int(image_token_id)

    @property
    def image_spec(self) -> VisionSetup:
        """The vision config and image token id: what task encoders need to build image examples."""
        return VisionSetup(self.vision.config, self.image_token_id)

    def forward(self, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None, **kw) -> TaskOutput:
        spec = self.tasks[task]
        if spec["type"] not in IMAGE_TASK_TYPES:
            return super().forward(task, input_ids, attention_mask, labels, **kw)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        embeds = self.image_embeds(input_ids, pixel_values, int(spec.get("augment") or 0))
        hidden = self.lm.model(input_ids, mask, inputs_embeds=embeds)
        aux = self._aux_loss() if self.training else None
        loss = None
        if spec["type"] == "vqa" and labels is not None:
            # only the positions that predict an answer token go through the LM head: logits [N,V]
            target_BT = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
            keep_BT = target_BT != -100
            logits = self.lm.lm_head(hidden[keep_BT])
            loss = F.cross_entropy(logits.float(), target_BT[keep_BT])
        elif spec["type"] == "vqa":
            logits = self.lm.lm_head(hidden)
        else:
            logits = self.heads[task](hidden, mask)
            if labels is not None:
                loss = F.cross_entropy(logits.float(), labels)
        return TaskOutput(logits=logits, loss=loss, aux_loss=aux)

    def vision_lm(self) -> SeekForVisionLM:
        """A SeekForVisionLM view sharing this model's trunk and tower (for generation)."""
        vlm = SeekForVisionLM.__new__(SeekForVisionLM)
        nn.Module.__init__(vlm)
        vlm.lm, vlm.vision, vlm.image_token_id = self.lm, self.vision, self.image_token_id
        return vlm

    def save_pretrained(self, path: str | os.PathLike, tokenizer=None, extra_files: dict[str, Any] | None = None,
                        dtype: torch.dtype | None = None) -> None:
        files = dict(extra_files or {})
        files.update(vision_files(self.vision, self.image_token_id))
        super().save_pretrained(path, tokenizer=tokenizer, extra_files=files, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> SeekForVisionMultiTask:
        base = SeekForMultiTask.from_pretrained(path, device, text_only=True)
        cfg, tid, state = read_vision_dir(path)
        model = cls(base.lm, list(base.tasks.values()), cfg, tid)
        model.heads.load_state_dict(base.heads.state_dict())
        load_tower_state(model.vision, state, str(path))
        return model.to(device).eval()


# ====================================================================== fine-tuning setup
@dataclass
class VisionSetup:
    """What a fine-tune with image tasks adds to the base model: the tower's config, its initial weights
    (from `pretrained` or a vision base) and the image token."""

    config: VisionConfig
    image_token_id: int
    state: dict[str, torch.Tensor] | None = None
    state_strict: bool = True

    def build(self, lm: SeekForCausalLM, decls: list[dict[str, Any]], seed: int = 0) -> SeekForVisionMultiTask:
        model = SeekForVisionMultiTask(lm, decls, self.config, self.image_token_id)
        model.vision.reset_parameters(seed=seed)
        if self.state is not None:
            load_tower_state(model.vision, self.state, "vision.pretrained", strict=self.state_strict)
        return model


def setup_vision(base: str | os.PathLike, tokenizer, lm: SeekForCausalLM, encoder: str = "vit-tiny",
                 pretrained: str | None = None, **overrides: Any) -> VisionSetup:
    """Prepare `lm` and `tokenizer` for image tasks: add `<|image|>` (growing the vocabulary when needed) and
    choose the tower: the base's own (a vision model dir), else preset `encoder` with `overrides`
    (image_size, patch_size, channels, pixel_shuffle, conv_stem), with the weights of `pretrained` when given."""
    from ..errors import RecipeError

    tid = add_image_token(tokenizer)
    grow_vocab(lm, tokenizer.vocab_size)
    if is_vision_dir(base):
        cfg, _, state = read_vision_dir(base)
        return VisionSetup(cfg, tid, state)
    cfg = VisionConfig.from_preset(encoder, **overrides)
    cfg.lm_hidden_size = lm.config.hidden_size
    if not pretrained:
        return VisionSetup(cfg, tid)
    if not is_vision_dir(pretrained):
        raise RecipeError(f"vision.pretrained {pretrained} is not a model directory with {VISION_CONFIG_FILE} "
                          f"and {VISION_FILE}")
    pcfg, _, state = read_vision_dir(pretrained)
    same = {k: v for k, v in pcfg.to_dict().items() if k not in ("lm_hidden_size", "projector_hidden_size")}
    pcfg.lm_hidden_size = lm.config.hidden_size
    if {k: v for k, v in cfg.to_dict().items() if k in same} != same:
        cfg = pcfg  # the pretrained encoder decides the architecture
    return VisionSetup(cfg, tid, state, state_strict=False)


__all__ = ["SeekForVisionLM", "SeekForVisionMultiTask", "VisionSetup", "setup_vision", "IMAGE_TOKEN",
           "IMAGE_TASK_TYPES", "VISION_FILE", "VISION_CONFIG_FILE", "add_image_token", "image_token_id",
           "grow_vocab", "expand_image_markers", "is_vision_dir", "read_vision_dir", "image_prefill"]

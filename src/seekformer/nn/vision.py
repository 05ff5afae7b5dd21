"""Vision building blocks (DeepSeek-VL style): a ViT patch encoder and a projector into the LM's hidden size.

Shapes: B images, C channels, S image side (pixels), P patch side, N = (S/P)^2 patches, E encoder width,
D the language model's hidden size, M image tokens after the projector (N, or N/4 with pixel shuffle).

    pixels_BCSS -> PatchEmbed (optional stem of `stem_layers` 3x3 convs, then conv P x P stride P; or with
                   `strided_stem` log2(P) stride-2 3x3 convs and a 1x1 conv, the "early convolutions" stem
                   of Xiao et al. 2021) + learned positions -> x_BNE
    x_BNE -> `layers` pre-norm Transformer blocks (bidirectional attention, GELU MLP) -> LayerNorm -> x_BNE
    Projector: optional 2x2 pixel shuffle (x_BNE -> x_B(N/4)(4E)), then Linear -> GELU -> Linear -> y_BMD
               (+ with `token_positions` a learned embedding per image-token slot, pos_1MD: where in the image
               a token is, given to the trunk directly rather than through the encoder's features)
               (+ with `global_token` one more token first: LayerNorm -> Linear -> GELU -> Linear of the whole
               flattened feature map x_B(NE), a position-aware summary of the image, as a plain CNN classifier
               reads it)

Presets are sized to train from scratch on a CPU in minutes. Pure torch, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VISION_PRESETS: dict[str, dict[str, Any]] = {
    # ~30k parameters: 8x8..32x32 images, tests and quick demos
    "vit-nano": dict(hidden_size=32, num_layers=1, num_heads=2, mlp_ratio=2.0, patch_size=4, conv_stem=False),
    # ~0.2M parameters: digits / shapes from scratch in minutes on 2 cores
    "vit-tiny": dict(hidden_size=64, num_layers=2, num_heads=4, mlp_ratio=2.0, patch_size=4, conv_stem=True),
    # ~1.2M parameters
    "vit-small": dict(hidden_size=128, num_layers=4, num_heads=4, mlp_ratio=4.0, patch_size=4, conv_stem=True),
    # ~5M parameters: 64..224 px images on a GPU
    "vit-base": dict(hidden_size=256, num_layers=6, num_heads=8, mlp_ratio=4.0, patch_size=16, conv_stem=True),
}


@dataclass
class VisionConfig:
    """The image encoder and projector. `lm_hidden_size` is the language model's D (set when attaching)."""

    encoder: str = "vit-tiny"  # the preset the other fields came from (informational)
    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0
    conv_stem: bool = True
    stem_layers: int = 1  # 3x3 convs (width hidden_size/2, GELU) in the conv stem
    strided_stem: bool = False  # patchify with log2(patch_size) stride-2 3x3 convs (+ 1x1) instead of P x P
    text_first: bool = True  # prompts put the question before the image (image tokens then see the question)
    pixel_shuffle: bool = False  # 2x2 patches -> one image token (4x fewer tokens)
    token_positions: bool = False  # a learned embedding per image-token slot added after the projector
    global_token: bool = False  # one more image token: an MLP of the whole flattened feature map
    projector_hidden_size: int | None = None  # default: lm_hidden_size
    lm_hidden_size: int = 64
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> VisionConfig:
        from ..errors import ConfigError

        if name not in VISION_PRESETS:
            raise ConfigError(f"unknown vision encoder {name!r}; choose one of: {', '.join(VISION_PRESETS)}")
        d = {**VISION_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
        cfg = cls(encoder=name, **d)
        cfg.validate()
        return cfg

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        from ..errors import ConfigError

        known = {f.name for f in fields(cls)}
        # vision.json files written before these keys: the image first, no slot embeddings
        d = {"text_first": False, "token_positions": False, "global_token": False, **d}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown vision config key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def num_image_tokens(self) -> int:
        """Image tokens one image puts into the LM's sequence."""
        return (self.num_patches // 4 if self.pixel_shuffle else self.num_patches) + int(self.global_token)

    def validate(self) -> None:
        from ..errors import ConfigError

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"vision config: {msg}")

        need(self.image_size >= 4 and self.patch_size >= 1, "image_size must be >= 4 and patch_size >= 1")
        need(self.image_size % self.patch_size == 0,
             f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        need(self.channels in (1, 3), f"channels must be 1 (grey) or 3 (RGB), got {self.channels}")
        need(self.hidden_size % self.num_heads == 0, "hidden_size must be a multiple of num_heads")
        need(self.num_layers >= 0, "num_layers must be >= 0")
        need(self.stem_layers >= 1, "stem_layers must be >= 1")
        need(not self.strided_stem or self.patch_size & (self.patch_size - 1) == 0,
             f"strided_stem needs a power-of-two patch_size, got {self.patch_size}")
        need(not self.pixel_shuffle or self.grid % 2 == 0,
             f"pixel_shuffle needs an even number of patches per side (image_size/patch_size = {self.grid})")


class PatchEmbed(nn.Module):
    """pixels [B,C,S,S] -> patch embeddings [B,N,E] (+ learned positions, one per patch of the g x g grid).

    The optional stem is `stem_layers` 3x3 convs (C -> E/2 -> ... -> E/2, GELU each) at full resolution.
    Patchify: one P x P conv with stride P, or with `strided_stem` log2(P) 3x3 convs of stride 2 (widths E/2
    ... E, GELU each) and a 1x1 conv: overlapping receptive fields, the local edge features small shapes need.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        e = cfg.hidden_size
        stem: list[nn.Module] = []
        width = cfg.channels
        for _ in range(cfg.stem_layers if cfg.conv_stem else 0):
            stem += [nn.Conv2d(width, e // 2, 3, padding=1), nn.GELU()]
            width = e // 2
        if cfg.strided_stem:
            n_down = cfg.patch_size.bit_length() - 1
            for i in range(n_down):
                out = e if i == n_down - 1 else e // 2
                stem += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GELU()]
                width = out
        self.stem = nn.Sequential(*stem) if stem else None
        patch = 1 if cfg.strided_stem else cfg.patch_size
        self.proj = nn.Conv2d(width, e, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, cfg.num_patches, e) * 0.02)

    def forward(self, pixels_BCSS: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixels_BCSS) if self.stem is not None else pixels_BCSS
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class VisionBlock(nn.Module):
    """Pre-norm Transformer block with bidirectional self-attention: x [B,N,E] -> [B,N,E]."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        e, self.heads = cfg.hidden_size, cfg.num_heads
        hidden = int(e * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(e, eps=cfg.layer_norm_eps)
        self.qkv = nn.Linear(e, 3 * e)
        self.proj = nn.Linear(e, e)
        self.norm2 = nn.LayerNorm(e, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(e, hidden)
        self.fc2 = nn.Linear(hidden, e)

    def forward(self, x_BNE: torch.Tensor) -> torch.Tensor:
        b, n, e = x_BNE.shape
        q, k, v = self.qkv(self.norm1(x_BNE)).view(b, n, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, e)
        x_BNE = x_BNE + self.proj(a)
        return x_BNE + self.fc2(F.gelu(self.fc1(self.norm2(x_BNE))))


class VisionEncoder(nn.Module):
    """ViT: pixels [B,C,S,S] (normalized) -> patch features [B,N,E]."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels_BCSS: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels_BCSS)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def pixel_shuffle(x_BNE: torch.Tensor, grid: int) -> torch.Tensor:
    """Merge each 2x2 block of neighbouring patches into one token: [B, g*g, E] -> [B, (g/2)^2, 4E]."""
    b, _, e = x_BNE.shape
    x = x_BNE.view(b, grid // 2, 2, grid // 2, 2, e).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (grid // 2) ** 2, 4 * e)


class Projector(nn.Module):
    """Patch features [B,N,E] -> image tokens [B,M,D]: optional 2x2 pixel shuffle, then a 2-layer GELU MLP."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.shuffle, self.grid = cfg.pixel_shuffle, cfg.grid
        d_in = cfg.hidden_size * (4 if cfg.pixel_shuffle else 1)
        d_mid = cfg.projector_hidden_size or cfg.lm_hidden_size
        self.norm = nn.LayerNorm(d_in, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(d_in, d_mid)
        self.fc2 = nn.Linear(d_mid, cfg.lm_hidden_size)
        self.pos = nn.Parameter(torch.zeros(1, cfg.num_image_tokens, cfg.lm_hidden_size)) \
            if cfg.token_positions else None
        d_flat = cfg.num_patches * cfg.hidden_size
        self.glob = nn.Sequential(nn.LayerNorm(d_flat, eps=cfg.layer_norm_eps), nn.Linear(d_flat, d_mid), nn.GELU(),
                                  nn.Linear(d_mid, cfg.lm_hidden_size)) if cfg.global_token else None

    def forward(self, x_BNE: torch.Tensor) -> torch.Tensor:
        g = self.glob(x_BNE.flatten(1)).unsqueeze(1) if self.glob is not None else None  # [B,1,D]
        if self.shuffle:
            x_BNE = pixel_shuffle(x_BNE, self.grid)
        y = self.fc2(F.gelu(self.fc1(self.norm(x_BNE))))
        if g is not None:
            y = torch.cat([g, y], dim=1)
        return y + self.pos if self.pos is not None else y


class VisionTower(nn.Module):
    """Encoder + projector: pixels [B,C,S,S] -> image token embeddings [B,M,D] for the LM's sequence."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.encoder = VisionEncoder(cfg)
        self.projector = Projector(cfg)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Truncated-normal(0.02) Linear weights, zero biases, Kaiming convs, unit LayerNorms."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        if self.projector.pos is not None:
            self.projector.pos.copy_(torch.randn(self.projector.pos.shape, generator=gen) * 0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen).clamp_(-2, 2) * 0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, pixels_BCSS: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(pixels_BCSS))


def splice_image_tokens(embeds_BTD: torch.Tensor, is_image_BT: torch.Tensor, image_BMD: torch.Tensor) -> torch.Tensor:
    """Put image token embeddings into the placeholder positions of a sequence.

    embeds_BTD: token embeddings; is_image_BT: True at placeholders, exactly M per image, images in row-major
    order; image_BMD: the images' tokens (B' images, B' * M == is_image.sum()). Returns a new [B,T,D] tensor.
    """
    n_slots, n_feats = int(is_image_BT.sum()), image_BMD.shape[0] * image_BMD.shape[1]
    if n_slots != n_feats:
        raise ValueError(f"{n_slots} image placeholder tokens but {image_BMD.shape[0]} image(s) x "
                         f"{image_BMD.shape[1]} tokens = {n_feats}")
    return embeds_BTD.masked_scatter(is_image_BT.unsqueeze(-1), image_BMD.to(embeds_BTD.dtype))


def random_translate(pixels_BCSS: torch.Tensor, max_shift: int, generator: torch.Generator | None = None,
                     fill: float = -1.0) -> torch.Tensor:
    """Training augmentation: shift each image by up to `max_shift` pixels in x and y (borders filled)."""
    if max_shift <= 0:
        return pixels_BCSS
    b, _, s, _ = pixels_BCSS.shape
    padded = F.pad(pixels_BCSS, (max_shift,) * 4, value=fill)
    off = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy: dy + s, dx: dx + s] for i, (dy, dx) in enumerate(off)])


__all__ = ["VisionConfig", "VisionEncoder", "VisionTower", "Projector", "PatchEmbed", "VisionBlock",
           "VISION_PRESETS", "pixel_shuffle", "splice_image_tokens", "random_translate"]

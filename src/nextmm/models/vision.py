"""The image encoder: a pre-norm ViT from pixels in [-1, 1] to one feature per token, CLS first when the
tower has one — the layout of Emu's EVA-CLIP features.

One class covers every family that `vision.kind` names, since they differ only in a few switches:

    kind     patch embedding      CLS   pre-norm   MLP activation   built for
    vit      conv stem or linear  yes   no         gelu             training from scratch (nextmm's own)
    clip     linear, no bias      yes   yes        quick_gelu       HF CLIPVisionModel weights
    siglip   linear               no    no         gelu_tanh        HF SiglipVisionModel weights
    eva      linear               yes   no         gelu             EVA-CLIP weights (Emu's tower)

A pretrained tower turns [-1, 1] into its own training normalisation inside, so callers never know it.
The same `Block` serves CLIP's text tower.
"""

from __future__ import annotations

import torch
from torch import nn

from nextmm.config import VISION_KINDS, ConfigError, VisionConfig
from nextmm.models.attention import attend

class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid approximation of GELU, which its weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
}


class Attention(nn.Module):
    """Multi-head self-attention with one fused q, k, v projection. EVA has no key bias; a zero one is exact
    and stays inert, since a key bias adds the same amount to all of a query's scores, which softmax ignores."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = attend(q, k, v, causal=causal)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float = 1e-5, act: str = "gelu"):
        super().__init__()
        # round: a ratio such as EVA's 6144 / 1408 times the width may land a hair below the integer
        hidden = round(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), ACTIVATIONS[act](), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), causal)
        return x + self.mlp(self.norm2(x))


def patch_embedding(cfg: VisionConfig) -> nn.Module:
    """Image -> one vector per patch. Pretrained towers and `stem=patch` use the plain linear patch
    projection (CLIP's without a bias). `conv` is the hybrid ViT's convolutional stem: stride-2 3x3
    convolutions with GroupNorm, one per halving, meant for towers trained from scratch: with two blocks on
    top, max-pooled, it learns single-object shape within seconds (research/shape_learning.py)."""
    if cfg.kind != "vit" or cfg.stem == "patch":
        return nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=cfg.kind != "clip")
    halvings = cfg.patch_size.bit_length() - 1
    if cfg.stem != "conv" or cfg.patch_size != 2**halvings or halvings < 2:
        raise ValueError(f"vision.stem '{cfg.stem}' with patch_size {cfg.patch_size}: use stem=patch, or stem=conv with a power-of-two patch_size >= 4")
    layers: list[nn.Module] = []
    channels = 3
    for i in range(halvings - 1):
        out = max(cfg.width >> (halvings - 1 - i), 16)
        layers += [nn.Conv2d(channels, out, 3, 2, 1), nn.GroupNorm(8 if out % 8 == 0 else 1, out), nn.GELU()]
        channels = out
    return nn.Sequential(*layers, nn.Conv2d(channels, cfg.width, 3, 2, 1))


def blocks_read(cfg: VisionConfig) -> int:
    """How many blocks the tokens at `feature_layer` have passed through (HF's hidden_states indexing)."""
    if not -(cfg.layers + 1) <= cfg.feature_layer <= cfg.layers:
        raise ConfigError(
            f"vision.feature_layer {cfg.feature_layer} is outside a {cfg.layers}-block tower; "
            f"set it from {-(cfg.layers + 1)} to {cfg.layers} (-1: the last block's output)"
        )
    return cfg.feature_layer % (cfg.layers + 1)


def _check(cfg: VisionConfig) -> None:
    if cfg.kind not in VISION_KINDS:
        raise ConfigError(f"vision.kind '{cfg.kind}' is unknown; set it to one of {', '.join(VISION_KINDS)}")
    if cfg.act not in ACTIVATIONS:
        raise ConfigError(f"vision.act '{cfg.act}' is unknown; set it to one of {', '.join(ACTIVATIONS)}")
    if len(cfg.mean) != 3 or len(cfg.std) != 3 or min(cfg.std) <= 0:
        raise ConfigError(f"vision.mean {cfg.mean} and vision.std {cfg.std} need three values each, std above 0")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"vision.image_size {cfg.image_size} must be a multiple of vision.patch_size {cfg.patch_size}")


class VisionTransformer(nn.Module):
    """(B, 3, H, W) pixels in [-1, 1] -> (B, cls_tokens + patches, width): the tokens after block
    `feature_layer`, then the final LayerNorm when `final_norm` (else the module has no `norm`)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        _check(cfg)
        self.cfg = cfg
        self.patch_embed = patch_embedding(cfg)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.width)) if cfg.cls_tokens else None
        self.pos = nn.Parameter(torch.randn(1, cfg.num_tokens, cfg.width) * 0.02)
        self.pre_norm = nn.LayerNorm(cfg.width, eps=cfg.eps) if cfg.kind == "clip" else None
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.eps, cfg.act) for _ in range(blocks_read(cfg)))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps) if cfg.final_norm else None
        # Not saved with the weights (the config holds them); None where the tower reads [-1, 1] as it is.
        as_is = list(cfg.mean) == [0.5] * 3 and list(cfg.std) == [0.5] * 3
        for name in ("mean", "std"):
            self.register_buffer(name, None if as_is else torch.tensor(getattr(cfg, name)).view(1, 3, 1, 1), persistent=False)

    @property
    def cls_tokens(self) -> int:
        """How many tokens precede the patch grid: features[:, cls_tokens:] are the patches, row by row."""
        return self.cfg.cls_tokens

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            pixels = ((pixels + 1) / 2 - self.mean) / self.std
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        return x if self.norm is None else self.norm(x)

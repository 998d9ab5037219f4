"""The image encoder: a pre-norm ViT whose output is every token of the last block (CLS first), then a
LayerNorm — the layout of Emu's EVA-CLIP features. The same `Block` serves CLIP's text tower."""

from __future__ import annotations

import torch
from torch import nn

from nextmm.config import VisionConfig
from nextmm.models.attention import attend


class Attention(nn.Module):
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
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), causal)
        return x + self.mlp(self.norm2(x))


def patch_embedding(cfg: VisionConfig) -> nn.Module:
    """Image -> one vector per patch. `patch` is the plain linear patch projection that pretrained ViTs
    (EVA-CLIP) use. `conv` is the hybrid ViT's convolutional stem: stride-2 3x3 convolutions with
    GroupNorm, one per halving, meant for towers trained from scratch: with two blocks on top, max-pooled, it
    learns single-object shape within seconds (benchmarks/shape_learning.py, BENCHMARKS.md)."""
    if cfg.stem == "patch":
        return nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size)
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


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"vision.image_size {cfg.image_size} must be a multiple of vision.patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.patch_embed = patch_embedding(cfg)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos = nn.Parameter(torch.randn(1, cfg.num_tokens, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 1 + patches, width)."""
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

"""Emu's causal transformer: N learned queries turn the encoder's patch grid into a causal sequence of N
visual embeddings. Causal self-attention (query i sees queries <= i) makes the embeddings an ordered
sequence the LLM can regress one at a time; cross-attention reads the patches. Blocks are T5-style:
pre-norm RMSNorm, no biases.

By default every query starts as its learned vector plus the channel-wise max of the projected patches
in its own region of the patch grid (`resampler.seed=regions`: the N queries tile the grid in rows x
columns, read in rows like text; `none` is Emu's causal transformer, learned vectors alone, as its
released weights expect). Cross-attention begins as a uniform average, and on a mostly blank canvas an
average drowns the few patches that hold objects: in supervised shape classification from scratch the
tower max-pooled learns shape within seconds, through the plain resampler it stays at chance
(research/shape_learning.py). One max over the whole grid fixes that for one object but mixes the
objects of a scene: the LLM names the right colours and shapes on the wrong objects; per-region maxima
keep objects apart and in place. A max says what a region holds but not where in it;
`resampler.region_coords` adds, for every channel, the position of its soft maximum, through a
zero-initialised projection, and captions improve (research/stage1_reading.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nextmm.config import ResamplerConfig
from nextmm.models.attention import attend


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class CrossOrSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(width, 2 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, causal: bool) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads
        q = self.q(x).view(b, t, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        y = attend(q, k, v, causal=causal)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class ResamplerBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm_self = RMSNorm(width)
        self.self_attn = CrossOrSelfAttention(width, heads)
        self.norm_cross = RMSNorm(width)
        self.cross_attn = CrossOrSelfAttention(width, heads)
        self.norm_mlp = RMSNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, width, bias=False))

    def forward(self, x: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, causal=True)
        x = x + self.cross_attn(self.norm_cross(x), patches, causal=False)
        return x + self.mlp(self.norm_mlp(x))


class CausalResampler(nn.Module):
    def __init__(self, cfg: ResamplerConfig, vision_width: int):
        super().__init__()
        self.cfg = cfg
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, cfg.width) * 0.02)
        self.patch_proj = nn.Linear(vision_width, cfg.width, bias=False)
        if cfg.seed == "regions" and cfg.region_coords:
            # Zero-initialised: the seeds start as before and learn how much of "where" to take in.
            self.coord_proj = nn.Linear(2 * vision_width, cfg.width, bias=False)
            nn.init.zeros_(self.coord_proj.weight)
        self.blocks = nn.ModuleList(ResamplerBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.width)
        # Each block starts as the identity (zero output projections, as in ReZero/Fixup), so the seeded
        # queries reach the LLM intact from the first step and shape is learned faster than with PyTorch's
        # default init (research/shape_learning.py).
        for block in self.blocks:
            for out in (block.self_attn.out, block.cross_attn.out, block.mlp[2]):
                nn.init.zeros_(out.weight)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        """(B, tokens, vision_width) -> (B, N, width): the visual embeddings."""
        patches = self.patch_proj(patch_features)
        x = self.queries.expand(patches.shape[0], -1, -1)
        if self.cfg.seed == "regions":
            # the square patch grid follows the tower's leading tokens (a CLS token, or none for SigLIP)
            leading = patches.shape[1] - math.isqrt(patches.shape[1]) ** 2
            x = x + region_max(patches[:, leading:], self.cfg.num_queries)
            if self.cfg.region_coords:
                x = x + self.coord_proj(region_coordinates(patch_features[:, leading:], self.cfg.num_queries))
        for block in self.blocks:
            x = block(x, patches)
        return self.norm(x)


def region_grid(n: int) -> tuple[int, int]:
    """N regions as rows x columns, as square as N allows, wider than tall (8 -> 2 x 4)."""
    rows = max(r for r in range(1, int(n**0.5) + 1) if n % r == 0)
    return rows, n // rows


def region_max(patches: torch.Tensor, n: int) -> torch.Tensor:
    """(B, side * side, width) patch features without CLS -> (B, n, width): the max over each region."""
    b, count, width = patches.shape
    side = int(count**0.5)
    grid = patches.transpose(1, 2).reshape(b, width, side, side)
    return F.adaptive_max_pool2d(grid, region_grid(n)).flatten(2).transpose(1, 2)


def region_coordinates(patches: torch.Tensor, n: int, sharpness: float = 10.0) -> torch.Tensor:
    """(B, side * side, width) patch features without CLS -> (B, n, 2 * width): for every channel, where in
    the image (x then y, from -0.5 to 0.5) its soft maximum over the region lies. A channel with nothing
    to find in a region (a blank canvas) points at the region's centre. A max keeps what a region holds
    but not where in it, and position decides left/above in captions and the direction of a motion."""
    b, count, width = patches.shape
    side = int(count**0.5)
    rows, cols = region_grid(n)
    grid = patches.transpose(1, 2).reshape(b, width, rows, side // rows, cols, side // cols)
    per_region = grid.permute(0, 2, 4, 1, 3, 5).reshape(b, n, width, -1)
    weights = torch.softmax(sharpness * per_region.float(), dim=-1)
    steps = torch.linspace(-0.5, 0.5, side, device=patches.device)
    ys = steps.view(rows, side // rows, 1, 1).expand(rows, side // rows, cols, side // cols)
    xs = steps.view(1, 1, cols, side // cols).expand(rows, side // rows, cols, side // cols)
    # (rows, h, cols, w) -> (n, h * w), in the order per_region lays the patches out
    xs, ys = (t.permute(0, 2, 1, 3).reshape(n, -1) for t in (xs, ys))
    where = torch.cat([(weights * xs[:, None]).sum(-1), (weights * ys[:, None]).sum(-1)], dim=-1)
    return where.to(patches.dtype)

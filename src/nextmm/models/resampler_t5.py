"""Emu1's causal transformer as its released checkpoint has it (the "cformer"): a T5 decoder stack whose input
embeddings are the N learned queries. Each block is pre-norm: causal self-attention with T5's learned
relative position bias, cross-attention to the vision tower's tokens, a ReLU feed-forward; a final norm
closes the stack. Norms are T5's (RMS, weight only) and no projection has a bias.

T5 differs from textbook attention in three ways that the weights depend on: the scores are not divided
by sqrt(head width) (the query projection's init carries that factor instead), the only position signal
is a learned bias per head and per bucket of "how far back" (computed once and shared by every block),
and the cross-attention keys and values project from the tower's width, which need not be the stack's
(Emu-14B: 1408 into 768).

`resampler_for` builds the causal transformer that `resampler.kind` names: this one, or the pre-norm
`CausalResampler` of models/resampler.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nextmm.config import RESAMPLER_KINDS, ConfigError, ResamplerConfig
from nextmm.models.resampler import CausalResampler, RMSNorm



def relative_bucket(back: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    """How far back each key lies from its query (query index - key index) -> T5's one-directional bucket:
    one bucket per step for the nearest buckets // 2 distances, then logarithmically wider buckets up to
    `max_distance`, beyond which all share the last. Keys ahead count as distance 0; the causal mask
    removes them."""
    back = back.clamp(min=0)
    exact = buckets // 2
    # T5's float expression, in its order, so that a distance on a bucket's edge lands where T5 puts it.
    scaled = torch.log(back.clamp(min=exact).float() / exact) / math.log(max_distance / exact) * (buckets - exact)
    far = (exact + scaled.long()).clamp(max=buckets - 1)
    return torch.where(back < exact, back, far)


class T5Attention(nn.Module):
    """Multi-head attention without biases or score scaling; keys and values read `context_width`."""

    def __init__(self, width: int, heads: int, head_width: int, context_width: int):
        super().__init__()
        self.heads = heads
        inner = heads * head_width
        self.q = nn.Linear(width, inner, bias=False)
        self.k = nn.Linear(context_width, inner, bias=False)
        self.v = nn.Linear(context_width, inner, bias=False)
        self.o = nn.Linear(inner, width, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, width), context (B, S, context_width), bias broadcastable to (B, heads, T, S) -> (B, T, width)."""
        b, t, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, y.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(context)), split(self.v(context))
        mask = None if bias is None else bias.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class T5FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.wi = nn.Linear(width, hidden, bias=False)
        self.wo = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.relu(self.wi(x)))


class T5Block(nn.Module):
    def __init__(self, width: int, heads: int, head_width: int, hidden: int, vision_width: int):
        super().__init__()
        # RMSNorm's default epsilon, 1e-6, is T5's.
        self.norm_self = RMSNorm(width)
        self.self_attn = T5Attention(width, heads, head_width, width)
        self.norm_cross = RMSNorm(width)
        self.cross_attn = T5Attention(width, heads, head_width, vision_width)
        self.norm_mlp = RMSNorm(width)
        self.mlp = T5FeedForward(width, hidden)

    def forward(self, x: torch.Tensor, patches: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, bias)
        # The tower's tokens enter unnormalised: the stack norms only its own stream (Emu norms the
        # tokens before, with ln_visual).
        x = x + self.cross_attn(self.norm_cross(x), patches)
        return x + self.mlp(self.norm_mlp(x))


class T5Resampler(nn.Module):
    """(B, tokens, vision_width) patch features -> (B, num_queries, width) visual embeddings, through a T5
    decoder stack fed the learned queries."""

    def __init__(self, cfg: ResamplerConfig, vision_width: int):
        super().__init__()
        if cfg.seed != "none":
            raise ConfigError(
                f"config key 'resampler.seed' is '{cfg.seed}', but resampler.kind=t5 reads its learned queries alone; set resampler.seed=none"
            )
        if not cfg.head_width and cfg.width % cfg.heads:
            raise ConfigError(
                f"config key 'resampler.width' is {cfg.width}, which {cfg.heads} heads do not divide; set resampler.head_width or a width that resampler.heads divides"
            )
        self.cfg = cfg
        self.head_width = cfg.head_width or cfg.width // cfg.heads
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.queries = nn.Parameter(torch.empty(cfg.num_queries, cfg.width))
        self.relative_bias = nn.Embedding(cfg.relative_buckets, cfg.heads)
        self.blocks = nn.ModuleList(T5Block(cfg.width, cfg.heads, self.head_width, hidden, vision_width) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """T5's init: every projection N(0, 1/fan_in), the query projections further scaled by
        1/sqrt(head_width) because the scores are not; the queries N(0, 0.02) as Emu's causal_tokens."""
        nn.init.normal_(self.queries, std=0.02)
        nn.init.normal_(self.relative_bias.weight, std=self.cfg.width**-0.5)
        for block in self.blocks:
            for attn in (block.self_attn, block.cross_attn):
                for proj in (attn.q, attn.k, attn.v, attn.o):
                    nn.init.normal_(proj.weight, std=proj.in_features**-0.5)
                attn.q.weight.data.mul_(self.head_width**-0.5)
            for proj in (block.mlp.wi, block.mlp.wo):
                nn.init.normal_(proj.weight, std=proj.in_features**-0.5)

    def self_attention_bias(self, n: int) -> torch.Tensor:
        """(heads, n, n): each head's learned bias for how far back a key lies; -inf on the keys ahead."""
        position = torch.arange(n, device=self.relative_bias.weight.device)
        back = position[:, None] - position[None, :]
        bias = self.relative_bias(relative_bucket(back, self.cfg.relative_buckets, self.cfg.relative_max_distance))
        return bias.permute(2, 0, 1).masked_fill(back < 0, float("-inf"))

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        """(B, tokens, vision_width) -> (B, N, width): the visual embeddings."""
        x = self.queries.expand(patch_features.shape[0], -1, -1)
        bias = self.self_attention_bias(x.shape[1])
        for block in self.blocks:
            x = block(x, patch_features, bias)
        return self.norm(x)


def resampler_for(cfg: ResamplerConfig, vision_width: int) -> nn.Module:
    """The causal transformer that `cfg.kind` names, reading `vision_width`-wide tower tokens."""
    if cfg.kind == "causal":
        return CausalResampler(cfg, vision_width)
    if cfg.kind == "t5":
        return T5Resampler(cfg, vision_width)
    raise ConfigError(f"config key 'resampler.kind' is '{cfg.kind}'; set it to one of {', '.join(RESAMPLER_KINDS)}")

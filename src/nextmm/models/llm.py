"""A LLaMA-style decoder: RMSNorm, rotary positions, SwiGLU, grouped-query SDPA attention, and a KV cache.

It reads embeddings rather than ids so that visual embeddings can stand in the sequence beside words.
Positions are given per row, so left-padded batches (batched generation) get the same rotary phases
as an unpadded sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nextmm.config import LLMConfig
from nextmm.models.attention import attend
from nextmm.models.resampler import RMSNorm


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), freqs)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, Dh); cos/sin: (B, 1, T, Dh/2). Rotates (first half, second half) pairs as HF LLaMA does."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class KVCache:
    """Preallocated keys/values for every layer. All rows write at the same offset, which holds because
    batched prompts are left-padded to one length."""

    def __init__(self, cfg: LLMConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        kv_heads = cfg.kv_heads or cfg.heads
        shape = (batch, kv_heads, max_len, cfg.width // cfg.heads)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the KV cache of {self.max_len}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class DecoderAttention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.heads = cfg.heads
        self.kv_heads = cfg.kv_heads or cfg.heads
        self.head_dim = cfg.width // cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * self.head_dim, cfg.width, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        y = attend(q, k, v, causal=mask is None and t > 1, mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.width, cfg.norm_eps)
        self.self_attn = DecoderAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.width, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.width, cfg.ffn_hidden)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaMA(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("llm.vocab_size must be set (it comes from the tokenizer)")
        if cfg.width % cfg.heads or cfg.heads % (cfg.kv_heads or cfg.heads):
            raise ValueError("llm.width must divide by llm.heads, and llm.heads by llm.kv_heads")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg.width // cfg.heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """GPT-2's initialisation: every matrix N(0, std), the projections that write into the residual
        stream scaled by 1/sqrt(2 x layers). With PyTorch's defaults (embeddings N(0, 1)) the tiny
        model learned to read its images about twice as slowly in stage 1 (BENCHMARKS.md)."""
        residual_std = std / (2 * self.cfg.layers) ** 0.5
        for name, param in self.named_parameters():
            if param.ndim == 2:
                nn.init.normal_(param, 0.0, residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std)

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """embeds (B, T, width) -> final-normed hidden states (B, T, width).

        positions: (B, T) rotary positions (default 0..T-1). mask: (B, 1, T, T_keys) bool, True where a
        query may attend; None means plain causal attention over the given tokens.
        """
        b, t, _ = embeds.shape
        if positions is None:
            positions = torch.arange(t, device=embeds.device).expand(b, t)
        if int(positions.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"sequence of {int(positions.max()) + 1} tokens exceeds the model's context of {self.cfg.max_seq_len}")
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_sin[positions].unsqueeze(1)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += t
        return self.norm(x)

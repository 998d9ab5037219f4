"""A LLaMA-style decoder: RMSNorm, rotary positions, SwiGLU, grouped-query attention, and a KV cache.

One model, set by its config, serves nextmm's own small LLMs and the Hugging Face families that
convert/hf_llm.py loads: Llama 2 and 3 (rotary scaling), Qwen2 (biases on q, k and v), Qwen3 (RMSNorm
on each head's q and k, a head width of its own) and Mistral (sliding-window attention).

It reads embeddings rather than ids so that visual embeddings can stand in the sequence beside words.
Positions are given per row, so left-padded batches (batched generation) get the same rotary phases
as an unpadded sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nextmm.config import ConfigError, LLMConfig
from nextmm.models.attention import attend
from nextmm.models.resampler import RMSNorm

# The rotary scalings nextmm implements, each with the settings it reads from LLMConfig.rope_scaling.
ROPE_SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
ROPE_TYPES = tuple(ROPE_SCALING_KEYS)


def rope_type(scaling: dict) -> str:
    """The kind of rotary scaling a config asks for; Hugging Face spells the key `rope_type` or, older, `type`."""
    return scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"


def llama3_frequencies(freqs: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                       original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1's context extension: a frequency whose wavelength is short next to the original context
    (under context / high_freq_factor) keeps its value, one whose wavelength is long (over context /
    low_freq_factor) is divided by `factor`, and those between blend the two linearly in context / wavelength."""
    wavelength = 2 * math.pi / freqs
    kept = ((original_max_position_embeddings / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
    return kept * freqs + (1 - kept) * freqs / factor


def rope_frequencies(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    kind = rope_type(scaling)
    if kind == "linear":
        return freqs / scaling["factor"]
    if kind == "llama3":
        return llama3_frequencies(freqs, **{k: scaling[k] for k in ROPE_SCALING_KEYS["llama3"]})
    if kind != "default":
        raise ConfigError(f"llm.rope_scaling has rope type '{kind}', which nextmm does not implement; use one of {', '.join(ROPE_TYPES)}")
    return freqs


def rope_tables(head_dim: int, max_len: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), rope_frequencies(head_dim, theta, scaling or {}))
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, Dh); cos/sin: (B, 1, T, Dh/2). Rotates (first half, second half) pairs as HF LLaMA does."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


def document_starts(documents: torch.Tensor) -> torch.Tensor:
    """Packed rows (B, T) of document indices -> where each document starts (B, T)."""
    return documents != F.pad(documents[:, :-1], (1, 0), value=-2)


def same_document(documents: torch.Tensor) -> torch.Tensor:
    """Packed rows (B, T) of document indices -> which pairs of positions belong to one document (B, T, T)."""
    return documents[:, :, None] == documents[:, None, :]


def document_layout(documents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows (B, T) of document indices (-1: padding, which sits at a row's end) -> the rotary positions
    (B, T), restarting at 0 with each document, and the attention mask (B, 1, T, T) that keeps each query
    causally within its own document: a packed batch computes what each document alone would. The padding
    attends within itself, since a query that may attend nowhere gives NaNs that would reach every gradient."""
    steps = torch.arange(documents.shape[1], device=documents.device)
    positions = steps - torch.where(document_starts(documents), steps, 0).cummax(1).values
    return positions, (same_document(documents) & (steps[None, :] <= steps[:, None])).unsqueeze(1)


def sliding_window(mask: torch.Tensor | None, queries: int, offset: int, window: int, device: torch.device) -> torch.Tensor:
    """`mask` (or plain causal attention) narrowed so that each query sees only the latest `window` keys,
    itself included. Queries are the cache slots offset..offset+queries-1; left padding sits before every
    real token, so slot distance is token distance."""
    q = torch.arange(offset, offset + queries, device=device).unsqueeze(1)
    k = torch.arange(offset + queries, device=device).unsqueeze(0)
    band = (k <= q) & (q - k < window)
    return band if mask is None else mask & band


class KVCache:
    """Preallocated keys/values for every layer. All rows write at the same offset, which holds because
    batched prompts are left-padded to one length."""

    def __init__(self, cfg: LLMConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        kv_heads = cfg.kv_heads or cfg.heads
        shape = (batch, kv_heads, max_len, cfg.head_size)
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
        self.head_dim = cfg.head_size
        self.q_proj = nn.Linear(cfg.width, cfg.heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.width, self.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.width, self.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.heads * self.head_dim, cfg.width, bias=False)
        # Qwen3 normalises each head's query and key, which keeps attention logits bounded without biases.
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)).transpose(1, 2)
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
        if (not cfg.head_dim and cfg.width % cfg.heads) or cfg.heads % (cfg.kv_heads or cfg.heads):
            raise ValueError("llm.width must divide by llm.heads (unless llm.head_dim is set), and llm.heads by llm.kv_heads")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg.head_size, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """GPT-2's initialisation for training from scratch: every matrix N(0, std), the projections that
        write into the residual stream scaled by 1/sqrt(2 x layers). PyTorch's defaults (embeddings N(0, 1))
        leave a small model slow to learn to read its images."""
        residual_std = std / (2 * self.cfg.layers) ** 0.5
        for name, param in self.named_parameters():
            if param.ndim == 2:
                nn.init.normal_(param, 0.0, residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std)
            elif name.endswith(".bias"):
                nn.init.zeros_(param)

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """embeds (B, T, width) -> final-normed hidden states (B, T, width).

        positions: (B, T) rotary positions (default: consecutive, after what the cache holds). mask:
        (B, 1, T, T_keys) bool, True where a query may attend; None means plain causal attention.
        """
        b, t, _ = embeds.shape
        offset = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(offset, offset + t, device=embeds.device).expand(b, t)
        if int(positions.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"sequence of {int(positions.max()) + 1} tokens exceeds the model's context of {self.cfg.max_seq_len}")
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_sin[positions].unsqueeze(1)
        if self.cfg.sliding_window and offset + t > self.cfg.sliding_window:
            mask = sliding_window(mask, t, offset, self.cfg.sliding_window, embeds.device)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += t
        return self.norm(x)

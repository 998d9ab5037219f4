"""Scaled dot-product attention, one function for every module.

On accelerators this is PyTorch's SDPA (flash / memory-efficient kernels). On CPU the plain
matmul-softmax path is used instead: for nextmm's short sequences and small heads it is 3-5x faster
than SDPA's CPU flash kernel for forward + backward in bf16 (benchmarks/attention.py).

Packed rows (data/packing.py) come with a block-diagonal bool mask (models/llm.py, document_layout). On CPU it
takes the same masked path: flex_attention, whose block masks skip the blocks between documents, has no CPU
backward (benchmarks/packing.py). On accelerators SDPA takes the bool mask, the fallback, as its flash kernel
takes no mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q (..., Tq, D), k/v (..., Tk, D); `causal` (Tq == Tk) or a bool `mask` broadcastable to
    (..., Tq, Tk), True where attention is allowed."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal and mask is None:
        tq, tk = q.shape[-2], k.shape[-2]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.float().softmax(-1).to(v.dtype) @ v

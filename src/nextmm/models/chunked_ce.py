"""Cross-entropy over the LM head without the full-vocabulary logits of every labelled position in memory at once.

A 128k-word vocabulary's fp32 logits for 16k labelled tokens take 8 GiB, and autograd keeps them for the
backward pass. Here the rows go through the LM head a chunk at a time, each chunk under activation
checkpointing, so only one chunk's logits exist at any moment; the backward pass recomputes them (one more
matmul per chunk). Written here because the loss needs nothing of a fused kernel's library: the head is one
Linear, and a chunked, checkpointed sum gives the same value and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")


def chunked_cross_entropy(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, rows: int) -> torch.Tensor:
    """Mean cross-entropy of `head(hidden)` (R, V) against `labels` (R,), `rows` rows of logits at a time."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(hidden), rows):
        part = slice(start, start + rows)
        total = total + checkpoint(_chunk_loss, head, hidden[part], labels[part], use_reentrant=False)
    return total / len(hidden)

"""Whether everything said since the latest picture holds in it: a soft minimum of the presence probe's reads.

The presence probe (heads/presence.py, PresenceProbe) tells, word by word, whether the phrase just read is in
the picture. A caption holds only if every phrase does, so the judge keeps a running soft minimum of those reads,
each weighed by a gate on its word (learned, so that reads after words that end no phrase count little), and
tells its verdict to the LLM's input and final hidden state. Left to find and combine those reads itself, the
LLM mostly stays at chance on whether a caption fits its picture, though the lowest of the reads at the
captions' shape words already tells fitting captions from one-word changes. With it, `is there a {colour}
{shape}?` is answered from the picture (config.py, llm.agreement).

The soft minimum of reads l_j with gates g_j is -log(sum g_j exp(-l_j) / sum g_j); it is kept as the two
log-sums, which one more word updates in place (`extend`) and a picture restarts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AgreementJudge(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.gate = nn.Linear(width, 1)  # how much a word's read counts, from the word alone
        self.judge = nn.Linear(1, 1)  # starts as the identity: the soft minimum is the verdict's logit
        nn.init.ones_(self.judge.weight)
        nn.init.zeros_(self.judge.bias)
        # Zero: the LLM reads nothing from them until its loss finds what the verdict is worth. `holds` joins the
        # input embedding, `holds_at_top` the final hidden state, where one direction moves the next token's logits
        # straight away (a yes or a no) without the layers having to carry it there.
        self.holds = nn.Parameter(torch.zeros(width))
        self.holds_at_top = nn.Parameter(torch.zeros(width))

    def terms(self, embeds: torch.Tensor, reads: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        """Word embeddings (..., width), the probe's reads (...,) and which positions count (...,) -> (..., 2)
        log(g exp(-l)) and log g, -inf where nothing counts. Only the gate trains through it."""
        log_gate = F.logsigmoid(self.gate(embeds.detach().to(self.gate.weight.dtype)).float()).squeeze(-1)
        log_gate, reads = torch.broadcast_tensors(log_gate, reads.detach().float())
        terms = torch.stack([log_gate - reads, log_gate], -1)
        return terms.masked_fill(~counted[..., None], float("-inf"))

    @staticmethod
    def extend(sums: torch.Tensor, terms: torch.Tensor, restart: torch.Tensor) -> torch.Tensor:
        """The log-sums (B, 2) after one more position per row: its terms (B, 2), or none where `restart` (B,)."""
        empty = torch.full_like(sums, float("-inf"))
        return torch.where(restart[:, None], empty, torch.logaddexp(sums, terms))

    def verdict(self, sums: torch.Tensor) -> torch.Tensor:
        """(..., 2) log-sums -> (...,) logit that all that was said holds; 0 (even odds) where nothing was."""
        said = torch.isfinite(sums[..., 1])
        soft_min = torch.where(said, sums[..., 1] - sums[..., 0], 0.0)
        return torch.where(said, self.judge(soft_min[..., None]).squeeze(-1), 0.0)

    def told(self, sums: torch.Tensor, at_top: bool = False) -> torch.Tensor:
        """(..., 2) log-sums -> (..., width): (2 p - 1) x the learned direction for the input (or, `at_top`, for
        the final hidden state), nothing where nothing was said."""
        said = torch.isfinite(sums[..., 1])
        p = torch.sigmoid(self.verdict(sums)).detach()
        direction = self.holds_at_top if at_top else self.holds
        return torch.where(said[..., None], (2 * p - 1)[..., None] * direction.float(), 0.0)

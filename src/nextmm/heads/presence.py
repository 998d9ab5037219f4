"""The presence probe (`llm.presence`): whether the phrase just read is in the latest picture, told to the
LLM's input; trained by its own balanced binary cross-entropy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PresenceProbe(nn.Module):
    """Whether the phrase just read is in the latest picture, told to the LLM: at every word after a picture,
    the words read so far (Emu.phrase_bags, the latest weighing most) ask that picture's visual embeddings
    how well any of them answers (a log-sum-exp of their scores, calibrated), and the word's input embedding
    gains (2 p - 1) x a learned direction. Trained on its own (Emu.presence_loss) on every phrase of the
    batch against every picture whose objects are known. The LLM does not learn to check a conjunction
    itself: "is there a red square?" and whether a caption fits its image stay at chance after thousands of
    examples. Asked of the visual embeddings through its own keys: on them a probe tells a picture's phrase from
    one object's colour with another's shape better than on the location pointer's patch keys and nearly as
    well as on the patches, which are 64 a picture where the embeddings are 8."""

    def __init__(self, width: int, visual_width: int, key_width: int = 64):
        super().__init__()
        self.query = nn.Linear(width, key_width, bias=False)
        self.key = nn.Linear(visual_width, key_width, bias=False)
        self.calibrate = nn.Linear(1, 1)  # starts as the identity: even odds for every phrase at first
        nn.init.ones_(self.calibrate.weight)
        nn.init.zeros_(self.calibrate.bias)
        # Zero: the LLM reads nothing from it until its loss finds what the answer is worth.
        self.found = nn.Parameter(torch.zeros(width))

    def logits(self, bags: torch.Tensor, visual: torch.Tensor, pictures: torch.Tensor | None = None) -> torch.Tensor:
        """bags (R, width) the phrases' mean word embeddings, visual (S, N, visual width) pictures' visual
        embeddings -> logits of each phrase being in its picture `pictures` (R,) -> (R,), or, without
        `pictures`, in every picture (R, S). Neither input trains through it."""
        keys = self.key(visual.detach().to(self.query.weight.dtype)).float()  # once per picture
        query = self.query(bags.detach().to(self.query.weight.dtype)).float() / keys.shape[-1] ** 0.5
        scores = torch.einsum("rk,snk->rsn", query, keys) if pictures is None else torch.einsum("rk,rnk->rn", query, keys[pictures])
        spread = torch.logsumexp(scores, -1, keepdim=True) - math.log(scores.shape[-1])  # 0 for a blind look
        return self.calibrate(spread).squeeze(-1)


def balanced_bce(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with the true and the false cases weighing half each (or all, when one is missing)."""
    losses = F.binary_cross_entropy_with_logits(logits, truth.float(), reduction="none")
    parts = [losses[truth].mean() if truth.any() else None, losses[~truth].mean() if (~truth).any() else None]
    return sum(p for p in parts if p is not None) / sum(p is not None for p in parts)

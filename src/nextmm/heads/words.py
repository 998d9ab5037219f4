"""The words that name an object, read straight from their embeddings: the bags the location pointer, the
presence probe and words-to-visual read (heads/location.py, presence.py, words_to_visual.py).

A run of words starts after an image's slots and after a box (the first word after a location token); inside
a box the bag stays that of the words before it. In a packed row a run also starts with each sample (`starts`). So
a grounding question's box reads its question, and each box of a detection answer its own object's phrase. Each
word counts by a learned gate on its embedding (the location pointer's `word_weight`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

PHRASE_DECAY = 0.5  # Words.phrase_bags: each earlier word counts half as much as the one after it


class Words:
    def __init__(self, embed: nn.Embedding, weight: Callable[[torch.Tensor], torch.Tensor], image_id: int, location_ids: torch.Tensor):
        self.embed, self.weight, self.image_id, self.location_ids = embed, weight, image_id, location_ids

    def _kinds(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        is_image = ids == self.image_id
        return is_image, ~(is_image | torch.isin(ids, self.location_ids))

    def _starts(self, input_ids: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T): where each position's run of words starts; `starts` (B, T) where a packed row's samples do."""
        is_image, is_word = self._kinds(input_ids)
        restart = is_image | (is_word & F.pad(torch.isin(input_ids, self.location_ids)[:, :-1], (1, 0)))
        if starts is not None:
            restart = restart | starts
        steps = torch.arange(input_ids.shape[1], device=input_ids.device)
        return torch.where(restart, steps, 0).cummax(1).values

    def _restarts(self, previous: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        is_image, is_word = self._kinds(tokens)
        return is_image | (is_word & torch.isin(previous, self.location_ids)), is_word

    def weighed(self, embeds: torch.Tensor, is_word: torch.Tensor) -> torch.Tensor:
        """(..., width) embeddings -> each word's gated embedding, fp32 (zeros for other tokens)."""
        return (self.weight(embeds) * embeds.float()) * is_word[..., None]

    def bags(self, input_ids: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> (B, T, width) fp32: at each position, the gated sum of the embeddings of the words in its run."""
        start = self._starts(input_ids, starts)
        total = self.weighed(self.embed(input_ids), self._kinds(input_ids)[1]).cumsum(1)
        before = total.gather(1, (start - 1).clamp_min(0)[..., None].expand_as(total))
        return total - torch.where((start > 0)[..., None], before, 0.0)

    def next_bags(self, bags: torch.Tensor, previous: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One more token per row: bags (B, width), the rows' previous tokens (B,) and the new ones (B,) -> the
        bags at the new tokens, as `bags` over the longer sequences would give."""
        restart, is_word = self._restarts(previous, tokens)
        added = self.weighed(self.embed(tokens), is_word)
        return torch.where(restart[:, None], added, bags + added)

    @torch.no_grad()
    def _phrase_terms(self, ids: torch.Tensor, is_word: torch.Tensor) -> torch.Tensor:
        """(..., width + 1): each word's gated embedding and, last, its gate (zeros for other tokens)."""
        embeds = self.embed(ids.clamp_min(0)).float()
        weight = self.weight(embeds) * is_word[..., None]
        return torch.cat([weight * embeds, weight], -1)

    def phrase_bags(self, input_ids: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> (B, T, width + 1): at each position, the words of its run summed with weights PHRASE_DECAY **
        (how many tokens back), their gates summed last. Its mean (`mean`) is mostly the phrase that just
        ended: "a large red circle above a small blue square" at "square" is mostly "small blue square".
        Detached: what reads it trains nothing else through it."""
        start = self._starts(input_ids, starts)
        steps = torch.arange(input_ids.shape[1], device=input_ids.device)
        back = (steps[:, None] - steps[None, :]).clamp_min(0).float()  # (T, T): how far j is behind t
        decay = torch.where((steps[None, :, None] >= steps[None, None, :]) & (steps[None, None, :] >= start[:, :, None]), PHRASE_DECAY**back, 0.0)
        return decay @ self._phrase_terms(input_ids, self._kinds(input_ids)[1])

    def next_phrase_bags(self, bags: torch.Tensor, previous: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One more token per row, as `next_bags` for `phrase_bags`."""
        restart, is_word = self._restarts(previous, tokens)
        added = self._phrase_terms(tokens, is_word)
        return torch.where(restart[:, None], added, PHRASE_DECAY * bags + added)

    def phrase_bags_of(self, phrases: torch.Tensor) -> torch.Tensor:
        """(R, L) phrases padded with -1 -> (R, width + 1): each one's bag at its last word, as `phrase_bags`
        gives it at that word of a sequence."""
        is_word = phrases >= 0
        last = is_word.long().cumsum(1).argmax(1, keepdim=True)
        back = (last - torch.arange(phrases.shape[1], device=phrases.device)).clamp_min(0).float()
        return ((PHRASE_DECAY**back)[..., None] * self._phrase_terms(phrases, is_word)).sum(1)

    @staticmethod
    def mean(bags: torch.Tensor) -> torch.Tensor:
        """(..., width + 1) phrase bags -> (..., width) their weighted mean embeddings."""
        return bags[..., :-1] / bags[..., -1:].clamp_min(1e-6)

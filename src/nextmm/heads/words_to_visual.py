"""Words to visual (`heads.words_to_visual`): the prompt's words regress the image's N embeddings too, straight
from their embeddings (the word bag at `[IMG]`, heads/words.py, through one linear map per embedding), beside
the LLM's hidden state. The LLM routes a prompt's content to `[IMG]` only after many text-to-image batches."""

from __future__ import annotations

import torch
from torch import nn

from nextmm.heads.base import Decoding, Head, Reading


class WordsToVisual(Head):
    def __init__(self, width: int, num_queries: int, visual_width: int):
        super().__init__()
        self.num_queries = num_queries
        # Zero: the LLM's regression alone until the L2 finds it worth more.
        self.weight = nn.Parameter(torch.zeros(width, num_queries * visual_width))

    def by_slot(self, bags: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Word bags at each picture's `[IMG]` (R, width) and which of the N embeddings each row is (R,) ->
        (R, visual width) the words' part of it."""
        mapped = (bags.detach().float() @ self.weight.float()).view(len(bags), self.num_queries, -1)
        return mapped[torch.arange(len(bags), device=bags.device), slots]

    def regress(self, reading: Reading, at: torch.Tensor, slots: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        return predicted + self.by_slot(reading.word_bags[at[:, 0], at[:, 1] - slots], slots)

    def decoding(self, reading: Reading) -> Decoding:
        return Drawing(self, reading.word_bags[:, -1])


class Drawing(Decoding):
    """While a picture is drawn after the prompt's `[IMG]`: the word bags there (B, width)."""

    def __init__(self, head: WordsToVisual, bags: torch.Tensor):
        self.head, self.bags = head, bags

    def regress(self, slot: int, predicted: torch.Tensor) -> torch.Tensor:
        return predicted + self.head.by_slot(self.bags, torch.full((len(self.bags),), slot, device=self.bags.device))

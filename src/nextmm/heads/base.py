"""The extension interface: what an extra head may add to Emu (models/emu.py), which calls these hooks and knows
nothing of any head.

A head (`Head`) may add to the LLM's input embeddings (`input`), to its final hidden states (`top`), to the
next-token logits (`logits`), to the regressed visual embeddings (`regress`) and its own loss terms (`losses`),
and it keeps its own state while a batch decodes one position at a time (`decoding`, a `Decoding`). Each hook
reads the batch through a `Reading`, which computes what several heads share once. With no head switched on
(config `heads`), `Heads` is empty and Emu is exactly the paper's composition.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from nextmm.heads.words import Words
from nextmm.models.llm import document_starts, same_document


def summed(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """What several heads add to one tensor, summed in their order; None when none adds anything."""
    parts = [p for p in parts if p is not None]
    return sum(parts[1:], parts[0]) if parts else None


class Reading:
    """One batch of sequences as the heads read it: the token ids (B, T), the batch's visual embeddings (M, N,
    visual width) and the tower's patch grids (M, P, vision width), both None without pictures, and which
    tokens are real (B, T; None: all, else a left-padded batch). In a packed batch (data/packing.py)
    `documents` (B, T) says which sample each position belongs to, and whatever a head reads back along a row
    stops at its sample's start. Heads leave what later heads read in `notes` (the presence probe's reads,
    which the agreement judge weighs)."""

    def __init__(self, model: nn.Module, heads: "Heads", input_ids: torch.Tensor, visual: torch.Tensor | None, patches: torch.Tensor | None,
                 valid: torch.Tensor | None = None, documents: torch.Tensor | None = None):
        self.model, self.heads, self.input_ids, self.visual, self.patches, self.valid = model, heads, input_ids, visual, patches, valid
        self.documents = documents
        self.notes: dict[str, object] = {}

    @cached_property
    def starts(self) -> torch.Tensor | None:
        """(B, T): where a packed batch's samples start; None for one sample a row."""
        return None if self.documents is None else document_starts(self.documents)

    @cached_property
    def same_document(self) -> torch.Tensor | None:
        """(B, T, T): which pairs of positions belong to one sample; None for one sample a row."""
        return None if self.documents is None else same_document(self.documents)

    @cached_property
    def latest_image(self) -> torch.Tensor:
        """(B, T): the index (among the batch's images, in reading order) of the last image each position
        follows in its sample, or -1 when there is none before it."""
        return self.heads.latest_image(self.input_ids, self.model.num_queries, self.documents)

    @cached_property
    def is_word(self) -> torch.Tensor:
        return self.heads.is_word(self.input_ids)

    @cached_property
    def words(self) -> Words | None:
        """The gated word embeddings the location pointer reads (heads/words.py); None when no head reads words."""
        return self.heads.words(self.model.llm.embed_tokens)

    @cached_property
    def word_bags(self) -> torch.Tensor | None:
        """(B, T, width): the words since the latest image or box at each position (Words.bags)."""
        return self.words.bags(self.input_ids, self.starts) if self.words is not None else None

    def phrase_bags(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, width + 1) Words.phrase_bags of the batch's rows, or (R, T, width + 1) of some of them (`rows` (R,))."""
        ids, starts = self.input_ids, self.starts
        if rows is not None:
            ids, starts = ids[rows], starts if starts is None else starts[rows]
        return self.words.phrase_bags(ids, starts)


class Decoding:
    """A head's state while generate.Stepper decodes a left-padded batch one position at a time. Each hook
    does nothing unless a head overrides it."""

    def token(self, previous: torch.Tensor, token: torch.Tensor) -> torch.Tensor | None:
        """One token per row (B,) is appended after `previous` (B,): what joins its input embedding (B, width)."""
        return None

    def embedding(self) -> None:
        """An input embedding no token gave (a regressed picture's) is appended."""

    def top(self, positions: int) -> torch.Tensor | None:
        """What joins the final hidden states of the latest `positions` positions (B, positions, width)."""
        return None

    def seen(self, hidden: torch.Tensor) -> None:
        """The final hidden states (B, new, width) of the positions just run (all of them without a KV cache)."""

    def logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The last position's hidden state (B, width) and the next token's scores so far (B, V) -> new scores."""
        return logits

    def regress(self, slot: int, predicted: torch.Tensor) -> torch.Tensor:
        """The regressed `slot`-th visual embedding of the picture being drawn (B, visual width) -> a new one."""
        return predicted


class Head(nn.Module):
    """An extra head. Each hook adds nothing unless the head overrides it; `heads` is the `Heads` it belongs to."""

    def input(self, reading: Reading) -> torch.Tensor | None:
        """What joins the LLM's input embeddings (B, T, width), fp32."""
        return None

    def top(self, reading: Reading) -> torch.Tensor | None:
        """What joins the LLM's final hidden states (B, T, width), fp32."""
        return None

    def logits(self, reading: Reading, hidden: torch.Tensor, which: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The hidden states of the whole batch (B, T, width), the positions asked (a (B, T) mask) and their
        next-token scores so far (R, V) -> new scores."""
        return logits

    def losses(self, reading: Reading, hidden: torch.Tensor, labels: torch.Tensor, extras: dict) -> dict[str, torch.Tensor | None]:
        """The head's own loss terms (None for a term the batch has nothing to teach), from the batch's hidden
        states, labels and what the data adds (`extras`: named_boxes, regions, claims, valid)."""
        return {}

    def regress(self, reading: Reading, at: torch.Tensor, slots: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """The regressed embeddings (R, visual width) at the positions `at` (R, 2: row, position), each the
        `slots`-th (R,) of its picture -> new ones."""
        return predicted

    def decoding(self, reading: Reading) -> Decoding | None:
        """This head's state for decoding after the prompt `reading`; None when it has nothing to keep."""
        return None

    def rate_scales(self, settings) -> dict[str, float]:
        """Learning-rate multipliers of parameter-name prefixes within the head, from stage 1's settings."""
        return {}


class Heads(nn.ModuleDict):
    """The extra heads switched on, in the order their hooks run, and the token ids they tell apart: the image
    slot `<image>`, the location tokens `<bin_0>` ... `<bin_{B-1}>` in order, and the markers."""

    def __init__(self, heads: dict[str, Head], image_id: int, location_ids: list[int] = (), special_ids: list[int] = ()):
        super().__init__(heads)
        self.image_id = image_id
        self.register_buffer("location_ids", torch.tensor(list(location_ids), dtype=torch.long), persistent=False)
        # what the copy head never copies: markers and image slots (boxes come from the location head)
        self.register_buffer("uncopyable", torch.tensor([image_id, *location_ids, *special_ids], dtype=torch.long), persistent=False)

    @property
    def change_scores(self) -> bool:
        """Whether any head changes the next-token scores (overrides `Head.logits`)."""
        return any(type(head).logits is not Head.logits for head in self.values())

    def read(self, model: nn.Module, input_ids: torch.Tensor, visual: torch.Tensor | None, patches: torch.Tensor | None,
             valid: torch.Tensor | None = None, documents: torch.Tensor | None = None) -> Reading:
        return Reading(model, self, input_ids, visual, patches, valid, documents)

    def is_location(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.isin(ids, self.location_ids)

    def is_word(self, ids: torch.Tensor) -> torch.Tensor:
        """Which tokens are words: neither an image slot nor a location token."""
        return ~((ids == self.image_id) | self.is_location(ids))

    def latest_image(self, input_ids: torch.Tensor, per_image: int, documents: torch.Tensor | None = None) -> torch.Tensor:
        is_slot = input_ids == self.image_id
        slots = is_slot.long()
        in_row = slots.cumsum(1)
        earlier_rows = slots.sum(1).cumsum(0) - slots.sum(1)
        index = torch.where(in_row > 0, torch.div(earlier_rows[:, None] + in_row - 1, per_image, rounding_mode="floor"), -1)
        if documents is None or not is_slot.any():
            return index
        image_documents = documents[is_slot][::per_image]  # each image's sample, read at its first slot
        return torch.where((index >= 0) & (image_documents[index.clamp_min(0)] == documents), index, -1)

    def words(self, embed: nn.Embedding) -> Words | None:
        pointer = getattr(self["location"], "pointer", None) if "location" in self else None
        if pointer is None or pointer.word_gate is None:
            return None
        return Words(embed, pointer.word_weight, self.image_id, self.location_ids)

    def input(self, reading: Reading) -> torch.Tensor | None:
        return summed([head.input(reading) for head in self.values()])

    def top(self, reading: Reading) -> torch.Tensor | None:
        return summed([head.top(reading) for head in self.values()])

    def logits(self, reading: Reading, hidden: torch.Tensor, which: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        for head in self.values():
            logits = head.logits(reading, hidden, which, logits)
        return logits

    def losses(self, reading: Reading, hidden: torch.Tensor, labels: torch.Tensor, extras: dict) -> dict[str, torch.Tensor]:
        terms = {}
        for head in self.values():
            terms.update(head.losses(reading, hidden, labels, extras))
        return {name: term for name, term in terms.items() if term is not None}

    def regress(self, reading: Reading, at: torch.Tensor, slots: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        for head in self.values():
            predicted = head.regress(reading, at, slots, predicted)
        return predicted

    def decoding(self, reading: Reading) -> list[Decoding]:
        states = [head.decoding(reading) for head in self.values()]
        return [state for state in states if state is not None]

    def rate_scales(self, settings, prefix: str) -> dict[str, float]:
        return {f"{prefix}{name}.{part}": scale for name, head in self.items() for part, scale in head.rate_scales(settings).items()}

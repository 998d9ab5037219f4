"""Sequence packing for stage 1 (`pretrain.pack_len`): a batch's samples laid end to end in rows of at most
`pack_len` tokens, instead of one right-padded row each, so that the model computes on words and pictures rather
than on padding (a caption is ~25 tokens, an 8-frame video ~95, and one padded row is as wide as the batch's longest).

A batch keeps its `batch_size` samples and takes as few rows as first-fit-decreasing finds for them, as wide as
the fullest (samples that fit only one to a row then waste no more than right padding): the samples a step
trains on are the same as without packing, and the tokens computed fall by the padding saved.
`documents` (B, T) tells which sample each position holds; Emu.loss keeps attention and the heads' reading
within each and restarts its rotary positions (models/llm.py, document_layout), so a packed sample's losses
are those it has alone. Samples longer than `pack_len` are skipped and counted, as those longer than the
model's context are (data/loader.py).
"""

from __future__ import annotations

import torch

from nextmm.data.sequence import Encoded, SequenceBuilder, SequenceTooLong


class LongerThanPack(SequenceTooLong):
    pass


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """The indices of `lengths` in bins of `capacity`: longest first, each into the first bin with room. Within
    a bin they keep their order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((b for b, free in enumerate(room) if lengths[i] <= free), None)
        if fit is None:
            bins.append([])
            room.append(capacity)
            fit = len(bins) - 1
        bins[fit].append(i)
        room[fit] -= lengths[i]
    return [sorted(b) for b in bins]


class Packer:
    """Packs a batch of encoded samples (SequenceBuilder.encode) into rows of at most `pack_len` tokens. `fit` checks
    one sample as it is encoded, so the loader skips and counts one too long; `collate` makes the batch."""

    def __init__(self, builder: SequenceBuilder, pack_len: int):
        self.builder, self.pack_len = builder, pack_len

    def fit(self, encoded: Encoded) -> Encoded:
        if len(encoded.ids) > self.pack_len:
            raise LongerThanPack(
                f"a sample of {len(encoded.ids)} tokens does not fit in a packed row of pretrain.pack_len={self.pack_len}; "
                f"raise pretrain.pack_len to {len(encoded.ids)} or more (at most llm.max_seq_len={self.builder.max_len})"
            )
        return encoded

    def collate(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        """The packed batch, as SequenceBuilder.lay_out gives it, with `slots` (2,): the token slots that one
        right-padded row per sample would take, and those the packed rows take."""
        lengths = [len(self.fit(e).ids) for e in batch]
        bins = first_fit_decreasing(lengths, self.pack_len)
        width = max(sum(lengths[i] for i in b) for b in bins)
        out = self.builder.lay_out([[batch[i] for i in b] for b in bins], width)
        out["slots"] = torch.tensor([len(batch) * max(lengths), len(bins) * width])
        return out

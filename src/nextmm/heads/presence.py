"""The presence probe (`heads.presence`): whether the phrase just read is in the latest picture, told to the
LLM's input; trained by its own balanced binary cross-entropy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nextmm.heads.base import Decoding, Head, Reading
from nextmm.heads.words import Words


class PresenceProbe(Head):
    """Whether the phrase just read is in the latest picture, told to the LLM: at every word after a picture,
    the words read so far (Words.phrase_bags, the latest weighing most) ask that picture's visual embeddings
    how well any of them answers (a log-sum-exp of their scores, calibrated), and the word's input embedding
    gains (2 p - 1) x a learned direction. Trained on its own (`presence_loss`) on every phrase of the
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

    def phrase_logits(self, bags: torch.Tensor, visual: torch.Tensor, pictures: torch.Tensor | None = None) -> torch.Tensor:
        """bags (R, width) the phrases' mean word embeddings, visual (S, N, visual width) pictures' visual
        embeddings -> logits of each phrase being in its picture `pictures` (R,) -> (R,), or, without
        `pictures`, in every picture (R, S). Neither input trains through it."""
        keys = self.key(visual.detach().to(self.query.weight.dtype)).float()  # once per picture
        query = self.query(bags.detach().to(self.query.weight.dtype)).float() / keys.shape[-1] ** 0.5
        scores = torch.einsum("rk,snk->rsn", query, keys) if pictures is None else torch.einsum("rk,rnk->rn", query, keys[pictures])
        spread = torch.logsumexp(scores, -1, keepdim=True) - math.log(scores.shape[-1])  # 0 for a blind look
        return self.calibrate(spread).squeeze(-1)

    def reads(self, bags: torch.Tensor, words: torch.Tensor, image_index: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bags (..., width + 1) from Words.phrase_bags, whether each position is a word (...,), its latest image
        (..., -1 for none), the batch's visual embeddings (M, N, visual width) -> which positions the probe
        reads (words after a picture) (...,) and its logits there (...,; 0 elsewhere), detached."""
        seen = words & (image_index >= 0)
        reads = torch.zeros(bags.shape[:-1], device=bags.device)
        if bool(seen.any()):
            reads = reads.index_put((seen,), self.phrase_logits(Words.mean(bags[seen]), visual, image_index[seen]).detach().float())
        return seen, reads

    def told(self, seen: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        """What the reads (...,) add to the input embeddings of the positions read (...,): (..., width)."""
        found = torch.where(seen, 2 * torch.sigmoid(reads) - 1, 0.0)
        return found[..., None] * self.found.float()

    def input(self, reading: Reading) -> torch.Tensor | None:
        if reading.visual is None:
            return None
        seen, reads = self.reads(reading.phrase_bags(), reading.is_word, reading.latest_image, reading.visual)
        reading.notes["presence"] = seen, reads
        return self.told(seen, reads)

    def losses(self, reading: Reading, hidden: torch.Tensor, labels: torch.Tensor, extras: dict) -> dict[str, torch.Tensor | None]:
        if extras.get("regions") is None:
            return {}
        return {"presence": self.presence_loss(reading, *extras["regions"][:2])}

    def presence_loss(self, reading: Reading, region_ids: torch.Tensor, region_image: torch.Tensor) -> torch.Tensor | None:
        """Binary cross-entropy for every phrase of the batch's regions (SequenceBuilder.collate_regions) against
        every picture that has regions: in it when one of that picture's regions reads the same words.
        Positives and negatives weigh half each. A picture's regions are all its objects (Shapes World's
        object_regions; a scene never repeats a colour and shape). None without regions."""
        if reading.visual is None or len(region_ids) < 2:
            return None
        pictures = region_image.unique()
        same = (region_ids[:, None, :] == region_ids[None, :, :]).all(-1)  # (R, R) the same phrase
        inside = (same.float() @ (region_image[:, None] == pictures[None, :]).float()) > 0  # (R, pictures)
        logits = self.phrase_logits(Words.mean(reading.words.phrase_bags_of(region_ids)), reading.visual[pictures])
        return balanced_bce(logits, inside)

    def decoding(self, reading: Reading) -> Decoding | None:
        return Probing(self, reading) if reading.visual is not None else None

    def rate_scales(self, settings) -> dict[str, float]:
        return {"query": settings.presence_lr_scale, "key": settings.presence_lr_scale, "calibrate": settings.presence_lr_scale,
                "found": settings.told_lr_scale}


class Probing(Decoding):
    """The presence probe while a batch decodes: each row's phrase bag at its newest position. Each token's reads
    are left in the reading's notes for the agreement judge."""

    def __init__(self, probe: PresenceProbe, reading: Reading):
        self.probe, self.reading, self.words = probe, reading, reading.words
        self.phrases = reading.words.phrase_bags(reading.input_ids)[:, -1]
        self.image_index = reading.latest_image[:, -1]  # every new position follows the prompt's last image

    def token(self, previous: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        self.phrases = self.words.next_phrase_bags(self.phrases, previous, token)
        seen, reads = self.probe.reads(self.phrases, self.reading.heads.is_word(token), self.image_index, self.reading.visual)
        self.reading.notes["presence_step"] = seen, reads
        return self.probe.told(seen, reads)


def balanced_bce(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with the true and the false cases weighing half each (or all, when one is missing)."""
    losses = F.binary_cross_entropy_with_logits(logits, truth.float(), reduction="none")
    parts = [losses[truth].mean() if truth.any() else None, losses[~truth].mean() if (~truth).any() else None]
    return sum(p for p in parts if p is not None) / sum(p is not None for p in parts)

"""OFA's location tokens read off the picture: `LocationHead` gives the logits of `<bin_0>` ... `<bin_{B-1}>`
as a parabola over the bins, and its `PatchPointer` places it by pointing into the latest image's patch grid.
Switched on by `heads.location` and `heads.pointer` (with `pointer_words`, `pointer_roles`). `location_token_loss`
is the soft-target cross-entropy of the location tokens (pretrain.location_sigma)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nextmm.config import Config
from nextmm.heads.base import Decoding, Head, Reading

PEAK_SIGMA = 1.0  # patches: PatchPointer.around_peak


class PatchPointer(nn.Module):
    """A place in the picture read straight off its patch grid: the hidden state asks (attention) which
    patches of the latest image it means, and the answer is their average position around the attention's
    peak (`around_peak`) plus a learned offset per patch: by the coordinate's order in the box (x or y,
    which edge; `box`, the default), or weighed by what the hidden state wants (`readout`, models saved
    without box roles). Models trained to average over the whole grid load and read around the peak too.
    The tiny LLM then only has to say which object, not carry where it is: ridge probes read a lone object's
    centre from the visual embeddings to ~3 px but from the LLM's hidden state, where a box begins, only to
    ~7 px, and hardly at all in scenes of several objects (research/grounding_probe.py).

    An average position, not a mixture of one answer per patch: with a mixture, a fixed patch near the
    boxes' mean answers every box early on, and the attention never leaves it."""

    def __init__(
        self, width: int, patch_width: int, grid: int, key_width: int = 64, offset_width: int = 16, words: bool = True, roles: bool = True
    ):
        super().__init__()
        self.query = nn.Linear(width, key_width, bias=False)
        # The words that name the object ask too, straight from their embeddings (a gated sum, heads/words.py):
        # the hidden state where a box starts carries the quoted phrase only after thousands of grounding
        # steps, while a linear key on the phrase itself finds the named object of two.
        self.words = nn.Linear(width, key_width, bias=False) if words else None
        self.word_gate = nn.Linear(width, 1) if words else None
        self.key = nn.Linear(patch_width, key_width, bias=False)
        self.offset = nn.Linear(patch_width, offset_width, bias=False)
        # Zero: the pointer moves no box until training finds what its answer is worth. With roles the
        # pointer's own box is the place, and no read of the hidden state moves it.
        self.readout = None if roles else nn.Linear(width, 2 + offset_width)
        if self.readout is not None:
            nn.init.zeros_(self.readout.weight)
            nn.init.zeros_(self.readout.bias)
        centres = (torch.arange(grid, dtype=torch.float) + 0.5) / grid - 0.5
        y, x = torch.meshgrid(centres, centres, indexing="ij")
        self.register_buffer("where", torch.stack([x.flatten(), y.flatten()], -1), persistent=False)  # (P, 2)
        self.grid = grid
        # A box is written x0 y0 x1 y1, so a place's axis and its side of the object follow from how many
        # location tokens came before it (box_roles): the pointer's own box (`box`) is the pointed place's
        # x or y, moved out by half a side read from the words (or the hidden state) and from the attended
        # patches, and LocationHead.pointer_loss trains it on every told box. Learned through the hidden state instead,
        # from the demo's few grounding batches, no box comes out right even while the pointer finds a lone
        # object to within a pixel or two; added to such reads, boxes still land tenths of the image off.
        self.half_side = nn.Linear(width, 1) if roles else None
        self.side_from_patches = nn.Parameter(torch.zeros(4, offset_width)) if roles else None
        if roles:
            nn.init.zeros_(self.half_side.weight)
            nn.init.constant_(self.half_side.bias, 0.15)  # about half of Shapes World's mean side
        self.register_buffer("side_of_role", torch.tensor([-1.0, -1.0, 1.0, 1.0]), persistent=False)

    def forward(
        self, hidden: torch.Tensor, patches: torch.Tensor, image_index: torch.Tensor, words: torch.Tensor | None = None, roles: torch.Tensor | None = None
    ) -> torch.Tensor:
        """hidden (R, width); patches (M, P, patch_width), the grids of a batch's M images; image_index (R,),
        each row's image; words (R, width), each row's bag from Words.bags; roles (R,), from box_roles
        -> (R,) a move of the place, in fractions of the image."""
        read = self.read(patches, image_index, self.attention(hidden, patches, image_index, words))
        if not self.writes_box:
            return (self.readout(hidden).float() * read).sum(-1)
        if roles is None:
            raise ValueError("this pointer places a box's sides by their order: pass each row's role (box_roles)")
        return self.box(read, hidden, words).gather(1, roles[:, None]).squeeze(1)

    @property
    def writes_box(self) -> bool:
        """Whether the place after an image is this pointer's own box (made with roles), not a move of the head's."""
        return self.half_side is not None

    def read(self, patches: torch.Tensor, image_index: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """(R, 2 + offset width): the place attended around the attention's peak (x, y, from the image's
        centre, in fractions of it) and the learned offsets of the patches there."""
        answers = torch.cat([self.where.expand(len(patches), -1, -1), self.offset(patches.to(self.offset.weight.dtype)).float()], -1)
        return torch.einsum("rp,rpv->rv", self.around_peak(attention), answers[image_index])

    def around_peak(self, attention: torch.Tensor) -> torch.Tensor:
        """(R, P) attention -> (R, P) the same, weighed by a Gaussian (sigma PEAK_SIGMA patches) around its
        peak, and summed to 1 again. The peak is the patch whose 3 x 3 neighbourhood holds the most of it on
        average (a sum favours the patch inside a corner's), placed at that neighbourhood's attended mean.
        Averaged over the whole grid, the share left on other objects pulls the place between them, and far
        fewer boxes of two- and three-object scenes come out right."""
        grid = attention.view(-1, 1, self.grid, self.grid)
        peak = F.avg_pool2d(grid, 3, stride=1, padding=1, count_include_pad=False).flatten(1).argmax(-1)
        near = (self.where - self.where[peak][:, None]).abs().amax(-1) * self.grid < 1.5  # (R, P): the 3 x 3 block
        held = attention * near
        centre = held @ self.where / held.sum(-1, keepdim=True)
        apart = (self.where - centre[:, None]) * self.grid  # (R, P, 2), in patches
        local = attention * torch.exp(-apart.square().sum(-1) / (2 * PEAK_SIGMA**2))
        return local / local.sum(-1, keepdim=True)

    def box(self, read: torch.Tensor, hidden: torch.Tensor, words: torch.Tensor | None) -> torch.Tensor:
        """(R, 4) the pointer's own box x0 y0 x1 y1, from the image's centre in fractions of it (needs roles)."""
        half = self.half_side(words if words is not None else hidden).float()
        return read[:, [0, 1, 0, 1]] + self.side_of_role * half + read[:, 2:] @ self.side_from_patches.T

    def word_weight(self, embeds: torch.Tensor) -> torch.Tensor:
        """(..., width) token embeddings -> (..., 1) how much each word counts in a bag (0 to 1)."""
        return torch.sigmoid(self.word_gate(embeds).float())

    def box_share(self, boxes: torch.Tensor) -> torch.Tensor:
        """(S, 4) boxes x0 y0 x1 y1 as fractions of the image -> (S, P) each patch's share of the box's area."""
        low = torch.arange(self.grid, device=boxes.device) / self.grid  # the patches' left (= top) edges
        high = low + 1 / self.grid
        across = (torch.minimum(boxes[:, None, 2], high) - torch.maximum(boxes[:, None, 0], low)).clamp_min(0)
        down = (torch.minimum(boxes[:, None, 3], high) - torch.maximum(boxes[:, None, 1], low)).clamp_min(0)
        area = (down[:, :, None] * across[:, None, :]).flatten(1)
        return area / area.sum(-1, keepdim=True).clamp_min(1e-12)

    def attention(
        self, hidden: torch.Tensor | None, patches: torch.Tensor, image_index: torch.Tensor, words: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(R, P) how much each row looks at each patch of its image (rows sum to 1). hidden None: the words
        alone ask (a region's phrase, LocationHead.region_loss)."""
        dtype = patches.dtype if hidden is None else hidden.dtype
        keys = self.key(patches.to(dtype))[image_index]
        query = None if hidden is None else self.query(hidden)
        if self.words is not None:
            if words is None:
                raise ValueError("this pointer also reads the words that name the object: pass their bags (Words.bags)")
            asked = self.words(words.to(dtype))
            query = asked if query is None else query + asked
        elif query is None:
            raise ValueError("this pointer does not read words: pass the hidden states that ask")
        return torch.softmax(torch.einsum("rk,rpk->rp", query, keys).float() / keys.shape[-1] ** 0.5, -1)


@dataclass
class Sight:
    """What the location pointer sees for each row: the batch's patch grids (M, P, patch width; Emu.see),
    each row's latest image (-1 for none; Reading.latest_image) and, when the pointer reads them, each row's
    word bag (Words.bags) and box role (box_roles)."""

    patches: torch.Tensor
    image_index: torch.Tensor
    words: torch.Tensor | None = None
    roles: torch.Tensor | None = None

    def rows(self, which: torch.Tensor) -> "Sight":
        words, roles = (t[which] if t is not None else None for t in (self.words, self.roles))
        return Sight(self.patches, self.image_index[which], words, roles)


class LocationHead(Head):
    """The logits of <bin_0> ... <bin_{B-1}> as a parabola over the bin index k:
    gate(h) - sharpness x (k - place(h))^2, so the most likely bin is wherever one linear read of the
    hidden state points, and near bins are nearly as likely. A row per bin has to learn how the bins are
    ordered before a box comes out near its object: reading a place off one direction of the hidden
    state, rows still miss by ~5 bins after 150 steps where the head misses by 1 (tests/test_model.py),
    and on grounding the head puts boxes' centres and, far more, their sides closer than rows do."""

    def __init__(self, width: int, bins: int, start_width: float = 4.0, pointer: PatchPointer | None = None):
        super().__init__()
        # place(h) is a fraction of the image, from the centre (0) out: in bins, its weights would have to
        # grow to tens and took hundreds of steps to (tests/test_model.py). Zero: every box starts centred.
        self.place = nn.Linear(width, 1)
        nn.init.zeros_(self.place.weight)
        nn.init.zeros_(self.place.bias)
        self.gate = nn.Linear(width, 1)
        # Wide at first (a Gaussian of sigma start_width bins): a far miss moves place by a bounded step.
        self.log_sharpness = nn.Parameter(torch.tensor(-math.log(2 * start_width**2)))
        self.register_buffer("bins", torch.arange(bins, dtype=torch.float), persistent=False)
        self.pointer = pointer

    def forward(self, hidden: torch.Tensor, sight: Sight | None = None) -> torch.Tensor:
        """(R, width) -> (R, bins) logits. With a pointer and each row's `sight`, a row that follows an
        image points into its patches."""
        fraction = self.place(hidden).float()
        seen = sight.image_index >= 0 if self.pointer is not None and sight is not None else None
        if seen is not None and bool(seen.any()):
            looked = sight.rows(seen)
            pointed = self.pointer(hidden[seen], looked.patches, looked.image_index, looked.words, looked.roles)
            # the pointer's own box is the place; a pointer without one moves the head's
            fraction = fraction.masked_scatter(seen[:, None], pointed if self.pointer.writes_box else fraction[seen, 0] + pointed)
        place = (len(self.bins) - 1) * (0.5 + fraction)
        return self.gate(hidden).float() - self.log_sharpness.exp() * (self.bins - place) ** 2

    @property
    def reads_words(self) -> bool:
        return self.pointer is not None and self.pointer.words is not None

    def sight(self, reading: Reading) -> Sight | None:
        """What the pointer sees at every position of the batch; None without pictures."""
        if reading.patches is None:
            return None
        if "sight" not in reading.notes:
            reading.notes["sight"] = Sight(reading.patches, reading.latest_image, reading.word_bags, box_roles(reading.input_ids, reading.heads.location_ids))
        return reading.notes["sight"]

    def logits(self, reading: Reading, hidden: torch.Tensor, which: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        sight = self.sight(reading)
        return logits.index_copy(-1, reading.heads.location_ids, self(hidden[which], sight.rows(which) if sight is not None else None))

    def losses(self, reading: Reading, hidden: torch.Tensor, labels: torch.Tensor, extras: dict) -> dict[str, torch.Tensor | None]:
        if self.pointer is None:
            return {}
        terms = {"pointer": self.pointer_loss(reading, hidden, labels, extras.get("named_boxes"))}
        if extras.get("regions") is not None:
            terms["regions"] = self.region_loss(reading, *extras["regions"])
        return terms

    def decoding(self, reading: Reading) -> Decoding:
        sight = self.sight(reading)
        # every new position follows the prompt's last image (new images end decoding)
        return Pointing(self, reading, sight.rows((slice(None), -1)) if sight is not None else None)

    def pointer_loss(self, reading: Reading, hidden: torch.Tensor, labels: torch.Tensor, named_boxes: torch.Tensor | None = None) -> torch.Tensor | None:
        """Cross-entropy of the PatchPointer's attention, where each labelled box is written, against the
        box's share of each patch (its overlap area): the pointer is told which patches the box covers
        instead of finding them through the bins' loss alone. A box is a run of exactly four labelled
        location tokens (x0 y0 x1 y1). `named_boxes` (B, T, 4; NaN where none) adds the boxes of objects
        that texts name (SequenceBuilder.encode's `named`), told at the text's last token: a question
        about one object asks the pointer the same thing as a grounding question. A named box trains the
        pointer alone: its hidden state, words and patches are detached. None when the batch has no box
        after an image."""
        sight = self.sight(reading)
        if sight is None:
            return None
        rows, boxes = written_boxes(labels, reading.heads.location_ids)
        named = torch.zeros(len(rows), dtype=torch.bool, device=labels.device)
        if named_boxes is not None:
            told = named_boxes[..., 0].isfinite().nonzero()
            rows, boxes = torch.cat([rows, told]), torch.cat([boxes, named_boxes[tuple(told.T)]])
            named = F.pad(named, (0, len(told)), value=True)
        if not len(rows):
            return None
        at = tuple(rows.T)
        keep = sight.image_index[at] >= 0
        if not keep.any():
            return None
        # Reaching the LLM, the embeddings and the tower, the named boxes of the reading batches (one for each
        # one-object caption or question, from the first step) hold off the LLM's reading its pictures.
        asking, looked, named = hidden[at][keep], sight.rows(at).rows(keep), named[keep]
        asking = torch.where(named[:, None], asking.detach(), asking)
        words = torch.where(named[:, None], looked.words.detach(), looked.words) if looked.words is not None else None
        # the patches twice, the second copy detached, which the named rows look at
        patches = torch.cat([looked.patches, looked.patches.detach()])
        image_index = torch.where(named, looked.image_index + len(looked.patches), looked.image_index)
        return self._pointing(asking, Sight(patches, image_index, words, looked.roles), boxes[keep])

    def region_loss(self, reading: Reading, region_ids: torch.Tensor, region_image: torch.Tensor, region_boxes: torch.Tensor) -> torch.Tensor | None:
        """The pointer's loss (as `pointer_loss`) for phrases of what boxes of the batch's pictures show
        (SequenceBuilder.collate_regions), asked by the phrase's word bag alone, with no LLM pass: every
        object of every picture teaches the pointer which words mean which patches. In the demo's stage 1,
        texts tell it about one object in a few batches; most of what it must learn is to choose among
        several. None without regions or without a pointer that reads words."""
        if reading.patches is None or not len(region_ids) or not self.reads_words:
            return None
        # Inputs detached: it trains the pointer alone. Reaching the towers and the embeddings as well, its
        # dozens of rows a batch cost the captions much of their quality.
        embeds = reading.model.llm.embed_tokens(region_ids.clamp_min(0)).detach()
        bags = reading.words.weighed(embeds, region_ids >= 0).sum(1)
        return self._pointing(None, Sight(reading.patches.detach(), region_image, bags), region_boxes)

    def _pointing(self, asking: torch.Tensor | None, looked: Sight, boxes: torch.Tensor) -> torch.Tensor | None:
        """Cross-entropy of the pointer's attention against each box's share of each patch, plus (with roles)
        the L1 of its own box; `asking` (R, width) the hidden states that ask, or None for the words alone."""
        pointer = self.pointer
        target = pointer.box_share(boxes)
        keep = target.sum(-1) > 0
        if not keep.any():
            return None
        looked, boxes, target = looked.rows(keep), boxes[keep], target[keep]
        asking = asking[keep] if asking is not None else None
        attention = pointer.attention(asking, looked.patches, looked.image_index, looked.words)
        loss = -(target * attention.clamp_min(1e-9).log()).sum(-1).mean()
        if not pointer.writes_box:
            return loss
        # Every told box also trains the pointer's own box: L1 in fractions of the image, x10 so that a
        # typical miss (~0.05) weighs about as much as the attention's cross-entropy above it. It trains the
        # pointer alone: reaching the LLM and the towers through its inputs, it cost caption exact match.
        patches, words = looked.patches.detach(), looked.words.detach() if looked.words is not None else None
        asking = asking.detach() if asking is not None else None
        alone = pointer.attention(asking, patches, looked.image_index, words)
        own = pointer.box(pointer.read(patches, looked.image_index, alone), asking, words)
        return loss + 10 * (own - (boxes - 0.5)).abs().mean()


class Pointing(Decoding):
    """The location head while a batch decodes: each row's sight at its newest position, its word bag and box
    role kept up to date token by token."""

    def __init__(self, head: LocationHead, reading: Reading, sight: Sight | None):
        self.head, self.sight, self.words, self.location_ids = head, sight, reading.words, reading.heads.location_ids

    def token(self, previous: torch.Tensor, token: torch.Tensor) -> None:
        if self.sight is not None:
            if self.sight.words is not None:
                self.sight.words = self.words.next_bags(self.sight.words, previous, token)
            self.sight.roles = torch.where(torch.isin(token, self.location_ids), (self.sight.roles + 1) % 4, 0)

    def logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_copy(-1, self.location_ids, self.head(hidden, self.sight))


def box_roles(input_ids: torch.Tensor, location_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T): which coordinate of a box the next token would be (0 x0, 1 y0, 2 x1, 3 y1), from
    how many location tokens end at each position."""
    is_location = torch.isin(input_ids, location_ids)
    steps = torch.arange(input_ids.shape[1], device=input_ids.device)
    last_other = torch.where(is_location, -1, steps).cummax(1).values
    return (steps - last_other) % 4


def bin_of(location_labels: torch.Tensor, location_ids: torch.Tensor) -> torch.Tensor:
    """(R,) ids of location tokens -> (R,) their bin indices k, as floats."""
    return (location_labels[:, None] == location_ids).float().argmax(-1).float()


def written_boxes(labels: torch.Tensor, location_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, 2) the (batch row, position) of each labelled location token in a box, and (R, 4) its box in
    fractions of the image."""
    is_location = torch.isin(labels, location_ids)
    window = F.pad(is_location, (1, 4)).unfold(1, 6, 1)  # is_location[t-1 .. t+4] at each t
    starts = (~window[..., 0] & window[..., 1:5].all(-1) & ~window[..., 5]).nonzero()
    rows = starts.repeat_interleave(4, 0)
    rows[:, 1] += torch.arange(4, device=labels.device).repeat(len(starts))
    boxes = bin_of(labels[tuple(rows.T)], location_ids).reshape(-1, 4) / (len(location_ids) - 1)
    return rows, boxes.repeat_interleave(4, 0)


def location_token_loss(location_ids: torch.Tensor, sigma: float):
    """The text loss of stage 1 (Emu.loss's `text_loss`): mean cross-entropy, where with sigma > 0 a location
    token's target is a Gaussian over the bins (sigma in bins) around the labelled one, less that target's
    entropy (a KL, 0 when exactly right, as CE is for a word). With one-hot targets a box one pixel off is as
    wrong as one across the image."""

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        per_token = F.cross_entropy(logits, labels, reduction="none")
        is_location = torch.isin(labels, location_ids)
        if sigma <= 0 or not is_location.any():
            return per_token.mean()
        bins = torch.arange(len(location_ids), device=logits.device, dtype=torch.float)
        labelled = bin_of(labels[is_location], location_ids)
        target = torch.softmax(-((bins - labelled[:, None]) ** 2) / (2 * sigma**2), dim=-1)
        log_probs = F.log_softmax(logits[is_location], dim=-1)[:, location_ids]
        kl = torch.where(target > 0, target * (target.clamp_min(1e-30).log() - log_probs), 0.0)  # far bins' targets underflow to 0
        return per_token.masked_scatter(is_location, kl.sum(-1)).mean()

    return loss


def location_head_for(cfg: Config, bins: int) -> LocationHead | None:
    """The LocationHead (with a PatchPointer) that `cfg.heads` asks for; None without one or without bins."""
    if not (cfg.heads.location and bins):
        return None
    grid = cfg.vision.image_size // cfg.vision.patch_size
    pointer = PatchPointer(cfg.llm.width, cfg.vision.width, grid, words=cfg.heads.pointer_words, roles=cfg.heads.pointer_roles) if cfg.heads.pointer else None
    return LocationHead(cfg.llm.width, bins, pointer=pointer)

"""OFA's location tokens read off the picture: `LocationHead` gives the logits of `<bin_0>` ... `<bin_{B-1}>`
as a parabola over the bins, and its `PatchPointer` places it by pointing into the latest image's patch grid.
Switched on by `llm.location_head` and `llm.location_pointer` (with `pointer_words`, `pointer_roles`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nextmm.config import Config

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
        # The words that name the object ask too, straight from their embeddings (a gated sum, Emu.word_bags):
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
        # location tokens came before it (Emu.box_roles): the pointer's own box (`box`) is the pointed place's
        # x or y, moved out by half a side read from the words (or the hidden state) and from the attended
        # patches, and Emu.pointer_loss trains it on every told box. Learned through the hidden state instead,
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
        each row's image; words (R, width), each row's bag from Emu.word_bags; roles (R,), from Emu.box_roles
        -> (R,) a move of the place, in fractions of the image."""
        read = self.read(patches, image_index, self.attention(hidden, patches, image_index, words))
        if not self.writes_box:
            return (self.readout(hidden).float() * read).sum(-1)
        if roles is None:
            raise ValueError("this pointer places a box's sides by their order: pass each row's role (Emu.box_roles)")
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
        alone ask (a region's phrase, Emu.region_loss)."""
        dtype = patches.dtype if hidden is None else hidden.dtype
        keys = self.key(patches.to(dtype))[image_index]
        query = None if hidden is None else self.query(hidden)
        if self.words is not None:
            if words is None:
                raise ValueError("this pointer also reads the words that name the object: pass their bags (Emu.word_bags)")
            asked = self.words(words.to(dtype))
            query = asked if query is None else query + asked
        elif query is None:
            raise ValueError("this pointer does not read words: pass the hidden states that ask")
        return torch.softmax(torch.einsum("rk,rpk->rp", query, keys).float() / keys.shape[-1] ** 0.5, -1)


@dataclass
class Sight:
    """What the location pointer sees for each row: the batch's patch grids (M, P, patch width; Emu.see),
    each row's latest image (-1 for none; Emu.latest_image) and, when the pointer reads them, each row's
    word bag (Emu.word_bags) and box role (Emu.box_roles)."""

    patches: torch.Tensor
    image_index: torch.Tensor
    words: torch.Tensor | None = None
    roles: torch.Tensor | None = None

    def rows(self, which: torch.Tensor) -> "Sight":
        words, roles = (t[which] if t is not None else None for t in (self.words, self.roles))
        return Sight(self.patches, self.image_index[which], words, roles)


class LocationHead(nn.Module):
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


def location_head_for(cfg: Config, bins: int) -> LocationHead | None:
    """The LocationHead (with a PatchPointer) that `cfg.llm` asks for; None without one or without bins."""
    if not (cfg.llm.location_head and bins):
        return None
    grid = cfg.vision.image_size // cfg.vision.patch_size
    pointer = PatchPointer(cfg.llm.width, cfg.vision.width, grid, words=cfg.llm.pointer_words, roles=cfg.llm.pointer_roles) if cfg.llm.location_pointer else None
    return LocationHead(cfg.llm.width, bins, pointer=pointer)

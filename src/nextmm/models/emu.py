"""The Emu model: ViT -> causal resampler -> visual embeddings, interleaved with token embeddings in a
LLaMA-style decoder that predicts the next word (cross-entropy) and the next visual embedding (L2).

Sequence layout: `[IMG]` + N x `<image>` + `[/IMG]` per picture; the `<image>` slots are filled, in
reading order, with the projected visual embeddings. The hidden state at `[IMG]` and at each `<image>`
but the last regresses the next visual embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nextmm.config import Config
from nextmm.models.llm import KVCache, LLaMA
from nextmm.models.resampler import CausalResampler
from nextmm.models.vision import VisionTransformer

IGNORE = -100


class PatchPointer(nn.Module):
    """A place in the picture read straight off its patch grid: the hidden state asks (attention) which
    patches of the latest image it means, and the answer is their average position plus a learned offset
    per patch, weighed by what the hidden state wants (x or y, which edge). The tiny LLM then only has to
    say which object, not carry where it is: ridge probes read a lone object's centre from the visual
    embeddings to ~3 px but from the LLM's hidden state, where a box begins, only to ~7 px, and hardly at
    all in scenes of several objects (benchmarks/grounding_probe.py, BENCHMARKS.md session 8).

    An average position, not a mixture of one answer per patch: with a mixture, a fixed patch near the
    boxes' mean answered every box early on, and the attention never left it (BENCHMARKS.md session 9)."""

    def __init__(self, width: int, patch_width: int, grid: int, key_width: int = 64, offset_width: int = 16):
        super().__init__()
        self.query = nn.Linear(width, key_width, bias=False)
        self.key = nn.Linear(patch_width, key_width, bias=False)
        self.offset = nn.Linear(patch_width, offset_width, bias=False)
        # Zero: the pointer moves no box until training finds what its answer is worth.
        self.readout = nn.Linear(width, 2 + offset_width)
        nn.init.zeros_(self.readout.weight)
        nn.init.zeros_(self.readout.bias)
        centres = (torch.arange(grid, dtype=torch.float) + 0.5) / grid - 0.5
        y, x = torch.meshgrid(centres, centres, indexing="ij")
        self.register_buffer("where", torch.stack([x.flatten(), y.flatten()], -1), persistent=False)  # (P, 2)
        self.grid = grid

    def forward(self, hidden: torch.Tensor, patches: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """hidden (R, width); patches (M, P, patch_width), the grids of a batch's M images; image_index (R,),
        each row's image -> (R,) a move of the place, in fractions of the image."""
        patches = patches.to(hidden.dtype)
        answers = torch.cat([self.where.expand(len(patches), -1, -1), self.offset(patches).float()], -1)[image_index]
        read = torch.einsum("rp,rpv->rv", self.attention(hidden, patches, image_index), answers)
        return (self.readout(hidden).float() * read).sum(-1)

    def box_share(self, boxes: torch.Tensor) -> torch.Tensor:
        """(S, 4) boxes x0 y0 x1 y1 as fractions of the image -> (S, P) each patch's share of the box's area."""
        low = torch.arange(self.grid, device=boxes.device) / self.grid  # the patches' left (= top) edges
        high = low + 1 / self.grid
        across = (torch.minimum(boxes[:, None, 2], high) - torch.maximum(boxes[:, None, 0], low)).clamp_min(0)
        down = (torch.minimum(boxes[:, None, 3], high) - torch.maximum(boxes[:, None, 1], low)).clamp_min(0)
        area = (down[:, :, None] * across[:, None, :]).flatten(1)
        return area / area.sum(-1, keepdim=True).clamp_min(1e-12)

    def attention(self, hidden: torch.Tensor, patches: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """(R, P) how much each row looks at each patch of its image (rows sum to 1)."""
        keys = self.key(patches.to(hidden.dtype))[image_index]
        return torch.softmax(torch.einsum("rk,rpk->rp", self.query(hidden), keys).float() / keys.shape[-1] ** 0.5, -1)


class LocationHead(nn.Module):
    """The logits of <bin_0> ... <bin_{B-1}> as a parabola over the bin index k:
    gate(h) - sharpness x (k - place(h))^2, so the most likely bin is wherever one linear read of the
    hidden state points, and near bins are nearly as likely. A row per bin has to learn how the bins are
    ordered before a box comes out near its object: reading a place off one direction of the hidden
    state, rows still missed by ~5 bins after 150 steps where the head missed by 1 (tests/test_model.py);
    continuing a demo model on grounding for 300 steps, box centres missed by 24 px and sides by 19 with
    rows, by 19 px and 6 with the head (BENCHMARKS.md, session 8)."""

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

    def forward(self, hidden: torch.Tensor, patches: torch.Tensor | None = None, image_index: torch.Tensor | None = None) -> torch.Tensor:
        """(R, width) -> (R, bins) logits. With a pointer, `patches` (M, P, patch width) and `image_index` (R,)
        (each row's latest image, -1 for none): a row that follows an image points into its patches."""
        fraction = self.place(hidden).float()
        seen = image_index >= 0 if self.pointer is not None and patches is not None else None
        if seen is not None and bool(seen.any()):
            fraction = fraction.masked_scatter(seen[:, None], fraction[seen, 0] + self.pointer(hidden[seen], patches, image_index[seen]))
        place = (len(self.bins) - 1) * (0.5 + fraction)
        return self.gate(hidden).float() - self.log_sharpness.exp() * (self.bins - place) ** 2


def location_head_for(cfg: Config, bins: int) -> LocationHead | None:
    """The LocationHead (with a PatchPointer) that `cfg.llm` asks for; None without one or without bins."""
    if not (cfg.llm.location_head and bins):
        return None
    grid = cfg.vision.image_size // cfg.vision.patch_size
    pointer = PatchPointer(cfg.llm.width, cfg.vision.width, grid) if cfg.llm.location_pointer else None
    return LocationHead(cfg.llm.width, bins, pointer=pointer)


class Emu(nn.Module):
    def __init__(self, cfg: Config, image_token_id: int, location_ids: list[int] = ()):
        super().__init__()
        self.cfg = cfg
        self.image_token_id = image_token_id
        # <bin_0> ... <bin_{B-1}> in order, for the soft location targets of `loss`; not saved with the weights
        self.register_buffer("location_ids", torch.tensor(list(location_ids), dtype=torch.long), persistent=False)
        self.vision = VisionTransformer(cfg.vision)
        self.resampler = CausalResampler(cfg.resampler, cfg.vision.width)
        self.visual_proj = nn.Linear(cfg.resampler.width, cfg.llm.width)
        self.llm = LLaMA(cfg.llm)
        self.regression_head = nn.Linear(cfg.llm.width, cfg.resampler.width, bias=False)
        # OFA's location tokens get their logits from LocationHead (none when the tokenizer has no bins)
        self.location_head = location_head_for(cfg, len(location_ids))

    @property
    def num_queries(self) -> int:
        return self.cfg.resampler.num_queries

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) -> visual embeddings (M, N, resampler width)."""
        return self.resampler(self.vision(pixels))

    def see(self, pixels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(M, 3, H, W) -> the visual embeddings and the encoder's patch grid (M, patches, vision width),
        which the location head points into; (None, None) for no images."""
        if not pixels.numel():
            return None, None
        features = self.vision(pixels)
        return self.resampler(features), features[:, 1:]

    def latest_image(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> for each position, the index (among the batch's images, in reading order) of the last
        image whose slots it follows, or -1 when its row has none before it."""
        slots = (input_ids == self.image_token_id).long()
        in_row = slots.cumsum(1)
        earlier_rows = slots.sum(1).cumsum(0) - slots.sum(1)
        index = torch.div(earlier_rows[:, None] + in_row - 1, self.num_queries, rounding_mode="floor")
        return torch.where(in_row > 0, index, -1)

    def embed(self, input_ids: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        embeds = self.llm.embed_tokens(input_ids)
        slots = (input_ids == self.image_token_id).unsqueeze(-1)
        if visual is None or visual.numel() == 0:
            if slots.any():
                raise ValueError("the sequence has <image> slots but no images were given")
            return embeds
        filled = self.visual_proj(visual).reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        if int(slots.sum()) != filled.shape[0]:
            raise ValueError(f"{int(slots.sum())} <image> slots but {filled.shape[0]} visual embeddings")
        return embeds.masked_scatter(slots, filled)

    def logits(self, hidden: torch.Tensor, patches: torch.Tensor | None = None, image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits (fp32) for hidden states (R, width): the LM head's, the location tokens' from
        the LocationHead, which points into `patches` (from `see`) at each row's `image_index` (from
        `latest_image`) when it has a pointer and they are given."""
        logits = self.llm.lm_head(hidden).float()
        if self.location_head is None:
            return logits
        return logits.index_copy(-1, self.location_ids, self.location_head(hidden, patches, image_index))

    def forward(
        self,
        input_ids: torch.Tensor,
        visual: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        return self.llm(self.embed(input_ids, visual), positions, mask, cache)

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        pixels: torch.Tensor,
        regression_weight: float = 1.0,
        target_visual: torch.Tensor | None = None,
        location_sigma: float = 0.0,
        pointer_weight: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """Text CE on labelled positions + regression_weight x L2 to the next visual embedding (weight 1 in a
        batch with no labelled text). With `location_sigma` > 0, a location token's target spreads over its
        neighbouring bins (see `text_loss`); with `pointer_weight` > 0, the text loss also holds that weight x
        `pointer_loss` where boxes are written ("text" in the result; "ce" stays the cross-entropy alone).

        Targets are detached, as in Emu; `target_visual` lets training supply them from a slowly moving
        copy of the visual stack (train/targets.py)."""
        visual, patches = self.see(pixels)
        hidden = self(input_ids, visual)
        picked = labels != IGNORE
        image_index = self.latest_image(input_ids)
        logits = self.logits(hidden[picked], patches, image_index[picked])
        ce = self.text_loss(logits, labels[picked], location_sigma) if picked.any() else hidden.sum() * 0
        out = {"ce": ce, "text": ce}
        pointer = self.pointer_loss(hidden, labels, patches, image_index) if pointer_weight > 0 else None
        if pointer is not None:
            out["pointer"], out["text"] = pointer, ce + pointer_weight * pointer
        loss = out["text"]
        if visual is not None:
            predicts_image = input_ids[:, 1:] == self.image_token_id
            predicted = self.regression_head(hidden[:, :-1][predicts_image])
            target = (visual if target_visual is None else target_visual).detach()
            l2 = F.mse_loss(predicted.float(), target.reshape(predicted.shape).float())
            # regression_weight trades L2 against CE. A batch with no text target (text-to-image pairs) has no
            # CE to trade against, and at 0.1 its lone L2 taught the LLM next to nothing (BENCHMARKS.md).
            weight = regression_weight if picked.any() else 1.0
            out["l2"], out["l2_weight"] = l2, torch.tensor(weight)
            loss = loss + weight * l2
        out["loss"] = loss
        return out

    def bin_of(self, location_labels: torch.Tensor) -> torch.Tensor:
        """(R,) ids of location tokens -> (R,) their bin indices k, as floats."""
        return (location_labels[:, None] == self.location_ids).float().argmax(-1).float()

    def pointer_loss(self, hidden: torch.Tensor, labels: torch.Tensor, patches: torch.Tensor | None, image_index: torch.Tensor) -> torch.Tensor | None:
        """Cross-entropy of the PatchPointer's attention, where each labelled box is written, against the
        box's share of each patch (its overlap area): the pointer is told which patches the box covers
        instead of finding them through the bins' loss alone. A box is a run of exactly four labelled
        location tokens (x0 y0 x1 y1). None when the batch writes no box after an image."""
        if self.location_head is None or self.location_head.pointer is None or patches is None:
            return None
        is_location = torch.isin(labels, self.location_ids)
        window = F.pad(is_location, (1, 4)).unfold(1, 6, 1)  # is_location[t-1 .. t+4] at each t
        starts = (~window[..., 0] & window[..., 1:5].all(-1) & ~window[..., 5]).nonzero()
        if not len(starts):
            return None
        rows = starts.repeat_interleave(4, 0)
        rows[:, 1] += torch.arange(4, device=labels.device).repeat(len(starts))
        at = tuple(rows.T)  # (batch row, position) of each location token in a box
        pointer = self.location_head.pointer
        target = pointer.box_share(self.bin_of(labels[at]).reshape(-1, 4) / (len(self.location_ids) - 1)).repeat_interleave(4, 0)
        keep = (image_index[at] >= 0) & (target.sum(-1) > 0)
        if not keep.any():
            return None
        attention = pointer.attention(hidden[at][keep], patches, image_index[at][keep])
        return -(target[keep] * attention.clamp_min(1e-9).log()).sum(-1).mean()

    def text_loss(self, logits: torch.Tensor, labels: torch.Tensor, location_sigma: float) -> torch.Tensor:
        """Mean cross-entropy; with location_sigma > 0, a location token's target is a Gaussian over the bins
        (sigma in bins) around the labelled one, less that target's entropy (a KL, 0 when exactly right, as
        CE is for a word). With one-hot targets a box one pixel off is as wrong as one across the image."""
        per_token = F.cross_entropy(logits, labels, reduction="none")
        is_location = torch.isin(labels, self.location_ids)
        if location_sigma <= 0 or not is_location.any():
            return per_token.mean()
        bins = torch.arange(len(self.location_ids), device=logits.device, dtype=torch.float)
        labelled = self.bin_of(labels[is_location])
        target = torch.softmax(-((bins - labelled[:, None]) ** 2) / (2 * location_sigma**2), dim=-1)
        log_probs = F.log_softmax(logits[is_location], dim=-1)[:, self.location_ids]
        kl = torch.where(target > 0, target * (target.clamp_min(1e-30).log() - log_probs), 0.0)  # far bins' targets underflow to 0
        per_token = per_token.masked_scatter(is_location, kl.sum(-1))
        return per_token.mean()

"""The Emu model: ViT -> causal resampler -> visual embeddings, interleaved with token embeddings in a
LLaMA-style decoder that predicts the next word (cross-entropy) and the next visual embedding (L2).

Sequence layout: `[IMG]` + N x `<image>` + `[/IMG]` per picture; the `<image>` slots are filled, in
reading order, with the projected visual embeddings. The hidden state at `[IMG]` and at each `<image>`
but the last regresses the next visual embedding.

Extra heads (heads/, switched on by the config's `heads`) join through the hooks of `self.heads`; with none,
the model is the paper's composition exactly.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nextmm.config import Config
from nextmm.heads import heads_for, renamed
from nextmm.heads.base import Reading
from nextmm.models.chunked_ce import chunked_cross_entropy
from nextmm.models.llm import KVCache, LLaMA, document_layout
from nextmm.models.resampler_t5 import resampler_for
from nextmm.models.vision import VisionTransformer

IGNORE = -100


class Emu(nn.Module):
    def __init__(self, cfg: Config, image_token_id: int, location_ids: list[int] = (), special_ids: list[int] = ()):
        super().__init__()
        self.cfg = cfg
        self.image_token_id = image_token_id
        self.vision = VisionTransformer(cfg.vision)
        self.ln_visual = nn.LayerNorm(cfg.vision.width, eps=1e-6) if cfg.emu.visual_norm else None
        self.resampler = resampler_for(cfg.resampler, cfg.vision.width)
        self.visual_proj = nn.Linear(cfg.resampler.width, cfg.llm.width)
        self.llm = LLaMA(cfg.llm)
        self.regression_head = nn.Linear(cfg.llm.width, cfg.visual_width, bias=False)
        self.heads = heads_for(cfg, image_token_id, location_ids, special_ids)
        self.register_load_state_dict_pre_hook(lambda module, state_dict, prefix, *rest: renamed(state_dict, prefix))

    @property
    def num_queries(self) -> int:
        return self.cfg.resampler.num_queries

    @property
    def regresses_in_llm_width(self) -> bool:
        return self.cfg.emu.regress_in == "llm"

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) -> visual embeddings (M, N, cfg.visual_width): what the LLM regresses."""
        return self.see(pixels)[0]

    def visual_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) -> the tower's tokens (M, T, vision width) as the causal transformer reads them."""
        features = self.vision(pixels)
        return self.ln_visual(features) if self.ln_visual is not None else features

    def see(self, pixels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(M, 3, H, W) -> the visual embeddings and the tower's patch grid (M, patches, vision width), which
        heads may read; (None, None) for no images."""
        if not pixels.numel():
            return None, None
        features = self.visual_tokens(pixels)
        visual = self.resampler(features)
        return self.visual_proj(visual) if self.regresses_in_llm_width else visual, features[:, self.vision.cls_tokens :]

    def to_llm(self, visual: torch.Tensor) -> torch.Tensor:
        """Visual embeddings (..., cfg.visual_width) -> the LLM's input embeddings (..., LLM width)."""
        return visual if self.regresses_in_llm_width else self.visual_proj(visual)

    def embed(self, input_ids: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (B, T, width) with the `<image>` slots filled by the visual embeddings, in order."""
        embeds = self.llm.embed_tokens(input_ids)
        slots = (input_ids == self.image_token_id).unsqueeze(-1)
        if visual is None or visual.numel() == 0:
            if slots.any():
                raise ValueError("the sequence has <image> slots but no images were given")
            return embeds
        filled = self.to_llm(visual).reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        if int(slots.sum()) != filled.shape[0]:
            raise ValueError(f"{int(slots.sum())} <image> slots but {filled.shape[0]} visual embeddings")
        return embeds.masked_scatter(slots, filled)

    def read(self, input_ids: torch.Tensor, visual: torch.Tensor | None, patches: torch.Tensor | None = None,
             valid: torch.Tensor | None = None, documents: torch.Tensor | None = None) -> Reading:
        """The batch as the heads read it (heads/base.py)."""
        return self.heads.read(self, input_ids, visual, patches, valid, documents)

    def forward(
        self,
        input_ids: torch.Tensor,
        visual: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        reading: Reading | None = None,
    ) -> torch.Tensor:
        """The LLM's hidden states (B, T, width) over the interleaved embeddings, with what the heads add to its
        input and to its final hidden states."""
        reading = reading if reading is not None else self.read(input_ids, visual)
        embeds = self.embed(input_ids, visual)
        added = self.heads.input(reading)
        if added is not None:
            embeds = embeds + added.to(embeds.dtype)
        hidden = self.llm(embeds, positions, mask, cache)
        top = self.heads.top(reading)
        return hidden if top is None else hidden + top.to(hidden.dtype)

    def logits(self, hidden: torch.Tensor, reading: Reading | None = None, which: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token scores (fp32) at the hidden states (..., width): the LM head's logits; with the batch's
        `reading` and the positions asked (`which`, a (B, T) mask into `hidden` (B, T, width)), those of the
        asked positions (R, V) with what the heads make of them (a copy head's are log-probabilities)."""
        if reading is None:
            return self.llm.lm_head(hidden).float()
        logits = self.llm.lm_head(hidden[which]).float()
        return self.heads.logits(reading, hidden, which, logits)

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        pixels: torch.Tensor,
        regression_weight: float = 1.0,
        target_visual: torch.Tensor | None = None,
        text_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        head_weight: float = 0.0,
        extras: dict | None = None,
        ce_chunk: int = 0,
        documents: torch.Tensor | None = None,
        drawn: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Text CE on labelled positions + regression_weight x L2 to the next visual embedding (weight 1 in a
        batch with no labelled text). `text_loss` (logits, labels) -> loss replaces the mean cross-entropy
        ("ce" in the result). With `head_weight` > 0 the heads' own loss terms, from what the data adds
        (`extras`: named_boxes, regions, claims, valid), join the text loss at that weight ("text"). With
        `ce_chunk` > 0 and neither a `text_loss` nor a head that changes the scores, the cross-entropy goes
        through the LM head that many rows at a time (models/chunked_ce.py), never holding every row's logits.
        `documents` (B, T), for rows that pack several samples (data/packing.py): which each position belongs to
        (-1: padding); no position attends or reads across them, and each one's rotary positions start at 0.
        `drawn` (M,) bool, one per picture in reading order: the pictures whose embeddings are regressed (a
        conversation's assistant draws some, its user only shows others); all of them when not given.

        Targets are detached, as in Emu; `target_visual` lets training supply them from a slowly moving
        copy of the visual stack (train/targets.py)."""
        visual, patches = self.see(pixels)
        positions, mask = document_layout(documents) if documents is not None else (None, None)
        reading = self.read(input_ids, visual, patches, documents=documents)
        hidden = self(input_ids, visual, positions, mask, reading=reading)
        picked = labels != IGNORE
        if not picked.any():
            self.logits(hidden, reading, picked)  # a head may keep running statistics as it scores
            ce = hidden.sum() * 0
        elif ce_chunk > 0 and text_loss is None and not self.heads.change_scores:
            ce = chunked_cross_entropy(self.llm.lm_head, hidden[picked], labels[picked], ce_chunk)
        else:
            ce = (text_loss or F.cross_entropy)(self.logits(hidden, reading, picked), labels[picked])
        out = {"ce": ce, "text": ce}
        if head_weight > 0:
            terms = self.heads.losses(reading, hidden, labels, extras or {})
            out.update(terms)
            if terms:
                out["text"] = ce + head_weight * sum(terms.values())
        loss = out["text"]
        if visual is not None and (drawn is None or drawn.any()):
            at, slots = self.regression_rows(input_ids, drawn)
            predicted = self.heads.regress(reading, at, slots, self.regress(hidden[tuple(at.T)]))
            target = (visual if target_visual is None else target_visual).detach()
            target = target if drawn is None else target[drawn.to(target.device)]
            l2 = F.mse_loss(predicted.float(), target.reshape(predicted.shape).float())
            # regression_weight trades L2 against CE. A batch with no text target (text-to-image pairs) has no
            # CE to trade against, and at 0.1 its lone L2 teaches the LLM next to nothing.
            weight = regression_weight if picked.any() else 1.0
            out["l2"], out["l2_weight"] = l2, torch.tensor(weight)
            loss = loss + weight * l2
        out["loss"] = loss
        return out

    def regress(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, width) hidden states where a visual embedding is regressed -> (R, visual width), fp32."""
        return self.regression_head(hidden.to(self.regression_head.weight.dtype)).float()

    def regression_rows(self, input_ids: torch.Tensor, drawn: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) -> where the next visual embedding is regressed (R, 2: row, position) and which of the N
        each is (R,); with `drawn` (M,) bool per picture, only the drawn pictures'."""
        predicts = F.pad(input_ids[:, 1:] == self.image_token_id, (0, 1))
        steps = torch.arange(input_ids.shape[1], device=input_ids.device)
        slots_before = steps - torch.where(input_ids != self.image_token_id, steps, -1).cummax(1).values  # 0 at [IMG]
        at = predicts.nonzero()
        if drawn is not None:  # the rows come picture by picture, N to each, in reading order
            at = at.view(len(drawn), self.num_queries, 2)[drawn.to(at.device)].reshape(-1, 2)
        return at, slots_before[tuple(at.T)]

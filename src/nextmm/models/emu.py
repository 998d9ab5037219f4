"""The Emu model: ViT -> causal resampler -> visual embeddings, interleaved with token embeddings in a
LLaMA-style decoder that predicts the next word (cross-entropy) and the next visual embedding (L2).

Sequence layout: `[IMG]` + N x `<image>` + `[/IMG]` per picture; the `<image>` slots are filled, in
reading order, with the projected visual embeddings. The hidden state at `[IMG]` and at each `<image>`
but the last regresses the next visual embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nextmm.config import Config
from nextmm.models.llm import KVCache, LLaMA
from nextmm.models.resampler import CausalResampler
from nextmm.models.vision import VisionTransformer

IGNORE = -100


class Emu(nn.Module):
    def __init__(self, cfg: Config, image_token_id: int):
        super().__init__()
        self.cfg = cfg
        self.image_token_id = image_token_id
        self.vision = VisionTransformer(cfg.vision)
        self.resampler = CausalResampler(cfg.resampler, cfg.vision.width)
        self.visual_proj = nn.Linear(cfg.resampler.width, cfg.llm.width)
        self.llm = LLaMA(cfg.llm)
        self.regression_head = nn.Linear(cfg.llm.width, cfg.resampler.width, bias=False)

    @property
    def num_queries(self) -> int:
        return self.cfg.resampler.num_queries

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) -> visual embeddings (M, N, resampler width)."""
        return self.resampler(self.vision(pixels))

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
    ) -> dict[str, torch.Tensor]:
        """Text CE on labelled positions + regression_weight x L2 to the next visual embedding (weight 1 in a
        batch with no labelled text).

        Targets are detached, as in Emu; `target_visual` lets training supply them from a slowly moving
        copy of the visual stack (train/targets.py)."""
        visual = self.encode_images(pixels) if pixels.numel() else None
        hidden = self(input_ids, visual)
        picked = labels != IGNORE
        logits = self.llm.lm_head(hidden[picked])
        ce = F.cross_entropy(logits.float(), labels[picked]) if picked.any() else hidden.sum() * 0
        out = {"ce": ce}
        loss = ce
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

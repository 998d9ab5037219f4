"""Where the regression targets come from.

Emu regresses visual embeddings made by the same encoder it trains. With an encoder that moves freely,
the cheapest way to lower the L2 loss is to make every image's embeddings alike (collapse). nextmm's
default takes targets from an exponential moving average of the visual stack (vision tower + causal
resampler), as BYOL and DINO do: the target moves slowly and never follows the online gradient, so
regression cannot drag it towards a constant, while text cross-entropy keeps the online stack
informative. `frozen` keeps the targets of the stage-0 encoder forever; `online` is Emu's plain
detached targets, kept for comparison.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nextmm.models.emu import Emu

TARGET_MODES = ("ema", "frozen", "online")


class VisualTarget(nn.Module):
    def __init__(self, model: Emu, decay: float):
        super().__init__()
        self.vision = copy.deepcopy(model.vision).requires_grad_(False)
        self.resampler = copy.deepcopy(model.resampler).requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.resampler(self.vision(pixels))

    @torch.no_grad()
    def update(self, model: Emu) -> None:
        if self.decay >= 1.0:
            return
        for mine, online in ((self.vision, model.vision), (self.resampler, model.resampler)):
            torch._foreach_lerp_(list(mine.parameters()), list(online.parameters()), 1.0 - self.decay)


def make_target(model: Emu, mode: str, decay: float) -> VisualTarget | None:
    if mode not in TARGET_MODES:
        raise ValueError(f"pretrain.target is '{mode}'; choose one of {', '.join(TARGET_MODES)}")
    if mode == "online":
        return None
    return VisualTarget(model, decay if mode == "ema" else 1.0)

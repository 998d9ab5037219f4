"""Where the regression targets come from.

Emu regresses visual embeddings made by the same encoder it trains. With an encoder that moves freely,
the cheapest way to lower the L2 loss is to make every image's embeddings alike (collapse). nextmm's
default takes targets from an exponential moving average of the visual stack (vision tower + causal
resampler), as BYOL and DINO do: the target moves slowly and never follows the online gradient, so
regression cannot drag it towards a constant, while text cross-entropy keeps the online stack
informative. `pretrain.target_ema=0` gives Emu's plain detached online targets.

Measured on Shapes World: under pure regression (no text loss) an EMA target only delays collapse
(spread 0.094 -> 0.007 in 120 steps); in real training text CE keeps embeddings far apart (spread
0.74 after the demo vs 0.08 at initialisation). For a guarantee, `pretrain.regression_reaches_visual=false`
stops the L2 gradient at the visual embeddings (train/regression.py); it scored lower in the demo,
its resampler keeping less colour information.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nextmm.models.emu import Emu


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
        for mine, online in ((self.vision, model.vision), (self.resampler, model.resampler)):
            torch._foreach_lerp_(list(mine.parameters()), list(online.parameters()), 1.0 - self.decay)


def make_target(model: Emu, decay: float) -> VisualTarget | None:
    """An EMA copy of the visual stack for `decay` in (0, 1); None (the online stack's own detached
    embeddings, as in Emu) for 0."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"pretrain.target_ema is {decay}; use 0 (online targets) or a decay in (0, 1) such as 0.995")
    return VisualTarget(model, decay) if decay > 0 else None

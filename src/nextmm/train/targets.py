"""Optional EMA regression targets (`pretrain.target_ema`, used when `pretrain.regression_reaches_visual`).

When the L2 gradient may train the visual stack, a slowly moving copy of that stack (BYOL/DINO style)
makes the targets, so they never follow the online gradient directly. Measured on Shapes World this
only slows collapse: in 60 steps of CE + L2 on a micro model the embeddings' spread still fell from
0.094 to 0.005 (tests/test_targets.py), which is why the default stops the L2 gradient at the visual
embeddings instead (train/regression.py). `target_ema=0` gives Emu's plain detached online targets.
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
    if decay > 0 and (model.ln_visual is not None or model.regresses_in_llm_width):
        raise ValueError("pretrain.target_ema copies the tower and causal transformer alone; set it to 0 with emu.visual_norm or emu.regress_in=llm")
    return VisualTarget(model, decay) if decay > 0 else None

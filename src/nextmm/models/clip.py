"""Stage 0: a CLIP-style contrastive image-text model. There is no pretrained EVA-CLIP on this machine,
so nextmm trains its own image tower on the image-caption pairs; Emu then reads that tower's features."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nextmm.config import CLIPTextConfig, VisionConfig
from nextmm.models.vision import Block, VisionTransformer


class TextTower(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, vocab_size: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.randn(1, cfg.max_len, cfg.width) * 0.01)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, 4.0) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded, causal; the feature is the last real token's (it has read them all)."""
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        for block in self.blocks:
            x = block(x, causal=True)
        x = self.norm(x)
        return x[torch.arange(ids.shape[0]), lengths - 1]


def text_batch(tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> (ids right-padded, lengths) as the text tower reads them: at most max_len - 1 tokens, then [EOS]."""
    seqs = [tokenizer.encode(t)[: max_len - 1] + [tokenizer.eos_id] for t in texts]
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), tokenizer.pad_id, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
    return ids, torch.tensor([len(s) for s in seqs])


class CLIP(nn.Module):
    def __init__(self, vision: VisionConfig, text: CLIPTextConfig, vocab_size: int):
        super().__init__()
        self.visual = VisionTransformer(vision)
        self.text = TextTower(text, vocab_size)
        self.image_proj = nn.Linear(vision.width, text.embed_dim, bias=False)
        self.text_proj = nn.Linear(text.width, text.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        # Max over all tokens: objects fill a few patches of a mostly blank canvas, and a mean drowns them
        # in background (zero-shot colour 0.63 with a mean, 1.0 with a max after the demo's 100 s).
        return F.normalize(self.image_proj(self.visual(pixels).amax(1)), dim=-1)

    def encode_image_cells(self, pixels: torch.Tensor, grid: int) -> torch.Tensor:
        """(B, 1 + grid², embed_dim) unit-length features: the whole image's (`encode_image`), then each
        cell's of a grid x grid split of the patches (none for grid 0), row by row, max-pooled the same
        way. A pooled feature cannot say which colour goes with which shape; a cell's mostly holds one object."""
        tokens = self.visual(pixels)
        patches = tokens[:, self.visual.cls_tokens :]
        side = math.isqrt(patches.shape[1])
        if grid < 0 or (grid and side % grid):
            raise ValueError(f"a {grid} x {grid} grid does not split the vision tower's {side} x {side} patches evenly")
        features = [tokens.amax(1, keepdim=True)]
        if grid:
            cell = side // grid
            features.append(patches.reshape(len(patches), grid, cell, grid, cell, -1).amax((2, 4)).flatten(1, 2))
        return F.normalize(self.image_proj(torch.cat(features, 1)), dim=-1)

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(ids, lengths)), dim=-1)

    def loss(self, pixels: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """Symmetric contrastive loss. `ids` holds the B images' captions, then any extra texts (hard
        negatives), which only compete as wrong answers for the images."""
        b = pixels.shape[0]
        image, text = self.encode_image(pixels), self.encode_text(ids, lengths)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * image @ text.T
        # A text equal to an image's own caption is a match, not a negative: score against any of them.
        same = (ids[:b].unsqueeze(1) == ids.unsqueeze(0)).all(-1).float()
        image_loss = F.cross_entropy(logits.float(), same / same.sum(-1, keepdim=True))
        text_loss = F.cross_entropy(logits[:, :b].T.float(), same[:, :b] / same[:, :b].sum(-1, keepdim=True))
        accuracy = (same.gather(1, logits.argmax(-1, keepdim=True)) > 0).float().mean()
        return {"loss": (image_loss + text_loss) / 2, "accuracy": accuracy}

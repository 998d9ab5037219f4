"""A frozen vision tower's outputs kept for the pictures it has seen, so that a picture coming back (the next epoch,
a caption pair read again text-first) skips the tower's forward pass.

With `pretrain.vision_lr_scale=0` the tower's weights never change and it has no dropout, so its output for a
picture is the same each time: stage 1 looks every picture up by a digest of its pixels and runs the tower only on
those it has not kept. The outputs live in CPU memory (a GPU's is worth more to the model), up to a budget, the
least recently used going first. It wraps the tower's forward from outside the model and is removed when the
stage ends, so the model directory and every later use see the plain tower.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from typing import Iterator

import torch
from torch import nn
from tqdm import tqdm


class TowerCache:
    def __init__(self, tower: nn.Module, max_bytes: int):
        self.run_tower = tower.forward
        self.max_bytes = max_bytes
        self.kept: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = self.hits = self.misses = 0

    @staticmethod
    def digest(picture: torch.Tensor) -> bytes:
        return hashlib.blake2b(picture.numpy().tobytes(), digest_size=16).digest()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        keys = [self.digest(p) for p in pixels.detach().cpu().contiguous()]
        missing = [i for i, key in enumerate(keys) if key not in self.kept]
        fresh = dict(zip(missing, self.run_tower(pixels[missing]))) if missing else {}
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        rows = []
        for i, key in enumerate(keys):
            if i in fresh:
                rows.append(fresh[i])
                self.keep(key, fresh[i])
            else:
                self.kept.move_to_end(key)
                rows.append(self.kept[key].to(pixels.device, non_blocking=True))
        return torch.stack(rows)

    def keep(self, key: bytes, output: torch.Tensor) -> None:
        size = output.numel() * output.element_size()
        if size > self.max_bytes:
            return
        self.kept[key] = output.detach().to("cpu", copy=True)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self.kept.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()

    def summary(self) -> str:
        asked = self.hits + self.misses
        share = self.hits / asked if asked else 0.0
        return f"{self.hits} of {asked} pictures ({share:.0%}) came from the frozen tower's cache ({len(self.kept)} kept, {self.bytes / 2**30:.2f} GiB)"


@contextlib.contextmanager
def tower_cache(tower: nn.Module, gib: float, name: str = "pretrain") -> Iterator[TowerCache | None]:
    """Within the block, `tower` answers from a cache of `gib` GiB (nothing changes at 0). Its parameters must be
    frozen, since a tower that learns gives another output for the same picture at every step."""
    if gib <= 0:
        yield None
        return
    if any(p.requires_grad for p in tower.parameters()):
        raise ValueError("a vision tower that trains cannot have its outputs cached")
    cache = TowerCache(tower, int(gib * 2**30))
    tower.forward = cache  # an instance attribute, which nn.Module.__call__ prefers to the class's forward
    try:
        yield cache
    finally:
        del tower.forward
        tqdm.write(f"[{name}] {cache.summary()}")

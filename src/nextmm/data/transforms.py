"""Image -> tensor with Pillow and NumPy (there is no CPU torchvision to lean on)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_pixels(images: list[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> (M, 3, size, size) float in [-1, 1]; resized with bicubic filtering when needed."""
    if not images:
        return torch.zeros(0, 3, size, size)
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.uint8))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0

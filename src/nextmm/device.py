"""Where a model runs: `auto` picks the best device present (a CUDA GPU, else Apple's MPS, else the CPU);
a named one (`cuda`, `cuda:1`, `mps`, `cpu`) must be there. Every tensor a step makes follows the model's
device, so the same code trains and generates on any of them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nextmm.errors import UserError


class DeviceError(UserError):
    pass


def present() -> list[str]:
    """The devices this machine has, by name, best first."""
    found = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found + ["cpu"]


def pick_device(name: str | None = "auto") -> torch.device:
    """`auto` (or None) -> the best device present; a named device is checked to be there."""
    if name in (None, "", "auto"):
        return torch.device(present()[0])
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device '{name}' is not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    available = present()
    wanted = f"cuda:{device.index or 0}" if device.type == "cuda" else device.type
    if wanted not in available:
        raise DeviceError(f"device '{name}' is not on this machine; use one of: auto, {', '.join(available)}")
    return torch.device(wanted)


def device_of(module: nn.Module) -> torch.device:
    """The device a module's weights are on (the CPU for a module without any)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def on_gpu(module: nn.Module) -> bool:
    """Whether `module` computes on a CUDA GPU, for which batches are worth pinning (data/loader.Prefetcher)."""
    return device_of(module).type == "cuda"


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch's tensors on `device` (copied without blocking from pinned memory); other values as they are."""
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}

"""Which precision to compute in: `bf16` autocast, `fp32`, or `auto` (whichever is faster here).

bf16 is not always the fast choice on a CPU: with native bf16 instructions (AMX, AVX512-BF16) its
matmuls run several times faster than fp32, but without them PyTorch emulates bf16 and the same
matmuls run several times *slower* (4.6x slower on an AVX-512 Xeon without AVX512-BF16, 2048^2,
measured 2026-11-24). `auto` times both once per process and picks the faster.
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch

from nextmm.config import PRECISIONS
from nextmm.errors import UserError


@functools.cache
def bf16_is_faster(device_type: str = "cpu") -> bool:
    """Time a training-sized matmul in both dtypes (a few tens of milliseconds, once per process)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()  # Ampere and newer; older GPUs would emulate it
    if device_type != "cpu":
        return False  # MPS and others: fp32, whose support is complete
    a, b = torch.randn(512, 512), torch.randn(512, 512)

    def seconds(dtype: torch.dtype) -> float:
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up: first call picks the kernel
        start = time.perf_counter()
        for _ in range(5):
            x @ y
        return time.perf_counter() - start

    return seconds(torch.bfloat16) * 1.2 < seconds(torch.float32)


def resolve(precision: str, device_type: str = "cpu") -> str:
    """'auto' -> 'bf16' or 'fp32' for this machine; the other two pass through."""
    if precision not in PRECISIONS:
        raise UserError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}; set it to auto, bf16 or fp32")
    if precision == "auto":
        return "bf16" if bf16_is_faster(device_type) else "fp32"
    return precision


def autocast(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """The autocast context for a (resolved or 'auto') precision."""
    if resolve(precision, device_type) == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

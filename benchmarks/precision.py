"""bf16 autocast vs fp32 on this machine: a 2048^2 matmul and one training step (forward + backward) of
the tiny image tower at batch 128, and what `precision: auto` resolves to here.
Usage: python benchmarks/precision.py. Prints JSON."""

import json
import time

import torch

from nextmm.config import make_config
from nextmm.models.vision import VisionTransformer
from nextmm.precision import autocast, resolve


def seconds(fn, repeats: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main():
    torch.manual_seed(0)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    tower = VisionTransformer(make_config("tiny").vision)
    pixels = torch.randn(128, 3, 64, 64)

    def tower_step(precision: str) -> None:
        with autocast(precision):
            features = tower(pixels)
        features.float().mean().backward()

    results = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = a.to(dtype), b.to(dtype)
        results[name] = {
            "matmul_2048_ms": round(1000 * seconds(lambda: x @ y), 1),
            "tiny_tower_step_ms": round(1000 * seconds(lambda: tower_step(name), 3), 1),
        }
    print(json.dumps({"benchmark": "precision", "threads": torch.get_num_threads(), **results, "auto_resolves_to": resolve("auto")}, indent=2))


if __name__ == "__main__":
    main()

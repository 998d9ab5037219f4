"""How fast a from-scratch image tower learns shape: supervised single-object shape classification on
Shapes World for a fixed wall-clock budget, `vision.stem=patch` (plain ViT) vs `conv` (hybrid stem).
Usage: python benchmarks/vision_stem.py [--seconds 40]. Prints JSON (held-out accuracy, chance 0.25)."""

import argparse
import json
import time

import numpy as np
import torch

from nextmm.config import make_config
from nextmm.data import shapes
from nextmm.data.transforms import to_pixels
from nextmm.models.vision import VisionTransformer


def run(stem: str, seconds: float, pixels: torch.Tensor, labels: torch.Tensor, train: int) -> dict:
    torch.manual_seed(0)
    cfg = make_config("tiny", overrides=[f"vision.stem={stem}"])
    tower = VisionTransformer(cfg.vision)
    head = torch.nn.Linear(cfg.vision.width, len(shapes.SHAPES))
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=2e-3, weight_decay=0.05)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        idx = torch.randint(0, train, (128,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(head(tower(pixels[idx]).mean(1)).float(), labels[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps += 1
    with torch.no_grad():
        accuracy = (head(tower(pixels[train:]).mean(1)).argmax(1) == labels[train:]).float().mean().item()
    return {"stem": stem, "steps": steps, "images_seen": steps * 128, "shape_accuracy": round(accuracy, 3)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=40)
    args = parser.parse_args()
    scenes = [shapes.sample_scene(np.random.default_rng([5, i]), n_objects=1) for i in range(12000)]
    pixels = to_pixels([s.image() for s in scenes], 64)
    labels = torch.tensor([shapes.SHAPES.index(s.objects[0].shape) for s in scenes])
    results = [run(stem, args.seconds, pixels, labels, 11000) for stem in ("patch", "conv")]
    print(json.dumps({"benchmark": "vision_stem_shape_learning", "seconds": args.seconds, "results": results}, indent=2))


if __name__ == "__main__":
    main()

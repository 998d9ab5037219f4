"""How fast the visual stack learns shape: supervised single-object shape classification on Shapes World
for a fixed wall-clock budget, from scratch, read out (a) from the image tower max-pooled, and (b) through
the causal resampler (all N embeddings into a linear head) with Emu's plain queries or with queries
seeded by the max over their region of the patch grid, at 1 and 2 blocks. Held-out accuracy, chance 0.25.
Usage: python research/shape_learning.py [--seconds 20]. Prints JSON."""

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from nextmm.config import make_config
from nextmm.data.transforms import to_pixels
from nextmm.models.resampler import CausalResampler
from nextmm.models.vision import VisionTransformer
from nextmm.precision import autocast
from nextmm.worlds.shapes import generator as shapes

VARIANTS = {
    "tower, max-pooled": None,
    "resampler, plain queries, 1 block": ("none", 1),
    "resampler, plain queries, 2 blocks": ("none", 2),
    "resampler, region-seeded queries, 1 block (default)": ("regions", 1),
    "resampler, region-seeded queries, 2 blocks": ("regions", 2),
}


def run(name: str, seconds: float, pixels: torch.Tensor, labels: torch.Tensor, train: int) -> dict:
    torch.manual_seed(0)
    cfg = make_config("tiny")
    tower = VisionTransformer(cfg.vision)
    modules = [tower]
    if VARIANTS[name] is None:
        head = torch.nn.Linear(cfg.vision.width, len(shapes.SHAPES))
        readout = lambda x: head(tower(x).amax(1))  # noqa: E731
    else:
        cfg.resampler.seed, cfg.resampler.layers = VARIANTS[name]
        resampler = CausalResampler(cfg.resampler, cfg.vision.width)
        head = torch.nn.Linear(cfg.resampler.width * cfg.resampler.num_queries, len(shapes.SHAPES))
        readout = lambda x: head(resampler(tower(x)).flatten(1))  # noqa: E731
        modules.append(resampler)
    params = [p for m in (*modules, head) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1.5e-3, weight_decay=0.05)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        idx = torch.randint(0, train, (32,))
        with autocast("auto"):
            loss = F.cross_entropy(readout(pixels[idx]).float(), labels[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps += 1
    with torch.no_grad(), autocast("auto"):
        accuracy = (readout(pixels[train:]).argmax(1) == labels[train:]).float().mean().item()
    return {"readout": name, "steps": steps, "shape_accuracy": round(accuracy, 3)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    scenes = [shapes.sample_scene(np.random.default_rng([5, i]), n_objects=1) for i in range(8000)]
    pixels = to_pixels([s.image() for s in scenes], 64)
    labels = torch.tensor([shapes.SHAPES.index(s.objects[0].shape) for s in scenes])
    results = [run(name, args.seconds, pixels, labels, 7000) for name in VARIANTS]
    print(json.dumps({"benchmark": "shape_learning", "seconds": args.seconds, "batch": 32, "results": results}, indent=2))


if __name__ == "__main__":
    main()

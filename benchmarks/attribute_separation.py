"""How far apart the LLM's regressions put prompts that differ in one word: over all 64 one-object Shapes
World captions, the mean distance between the regressions of two captions that differ only in size, only
in colour or only in shape (per embedding, the L2 distance averaged over the N). Beside them, the same for
the decoder's semantic token (the regressions read out onto CLIP's image space), when it has one, and for
CLIP's image features themselves, averaged per caption over held-out pictures. A shape far closer than a
colour in the regressions is what a decoder must amplify to draw it.

Usage: python benchmarks/attribute_separation.py --model runs/demo/model [--pictures 2000]
Prints one JSON line.
"""

import argparse
import itertools
import json

import torch

import nextmm
from nextmm.data.shapes import COLOURS, SHAPES
from nextmm.eval.images import held_out_scenes

ATTRIBUTES = ("size", "colour", "shape")
CAPTIONS = {(size, colour, shape): f"a {size} {colour} {shape}" for size in ("small", "large") for colour in COLOURS for shape in SHAPES}


def separation(points: dict[tuple, torch.Tensor]) -> dict[str, float]:
    """Mean distance between the points of keys that differ in exactly one attribute, per attribute.
    A point is (..., d): the distance is over d, averaged over the rest."""
    out = {}
    for axis, name in enumerate(ATTRIBUTES):
        pairs = [(a, b) for a, b in itertools.combinations(points, 2) if [i for i in range(3) if a[i] != b[i]] == [axis]]
        out[name] = round(float(torch.stack([(points[a] - points[b]).norm(dim=-1).mean() for a, b in pairs]).mean()), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--pictures", type=int, default=2000, help="held-out one-object pictures for CLIP's per-caption means")
    args = parser.parse_args()
    m = nextmm.load(args.model)
    keys = list(CAPTIONS)
    regressed = m.regress([CAPTIONS[k] for k in keys]).float()
    results = {"regressed": separation(dict(zip(keys, regressed)))}
    if m.decoder is not None and m.decoder.semantic_width:
        with torch.no_grad():
            semantic = m.decoder._semantic(regressed, torch.zeros(len(keys), dtype=torch.bool))
        results["semantic_token"] = separation(dict(zip(keys, semantic)))
    if m.clip is not None:
        scenes = held_out_scenes(1, args.pictures)
        features = m.clip_image_features([image for _, image in scenes])
        by_caption: dict[str, list[torch.Tensor]] = {}
        for (caption, _), feature in zip(scenes, features):
            by_caption.setdefault(caption, []).append(feature)
        means = {k: torch.stack(by_caption[c]).mean(0) for k, c in CAPTIONS.items() if c in by_caption}
        results["clip_pictures"] = separation(means)
    print(json.dumps({"model": args.model, **results}))


if __name__ == "__main__":
    main()

"""How far apart the LLM's regressions put prompts that differ in one word: over all 64 one-object Shapes
World captions, the mean distance between the regressions of two captions that differ only in size, only
in colour or only in shape (per embedding, the L2 distance averaged over the N). Beside them, the same for
the decoder's semantic token (the regressions read out onto CLIP's image space), when it has one, and for
CLIP's image features themselves, averaged per caption over held-out pictures. A shape far closer than a
colour in the regressions is what a decoder must amplify to draw it.

"binding": on held-out two-object captions, how far a caption's regression (and its read-outs: the whole
picture's token, and the grid cells' tokens when the decoder has them) moves when its two colours (shapes)
are swapped, against when one colour (shape) is replaced by a third; `*_ratio` is swap / third. A ratio
near 0 means only the bag of words is read, not which colour goes with which shape.

Usage: python research/attribute_separation.py --model runs/demo/model [--pictures 2000]
Prints one JSON line.
"""

import argparse
import itertools
import json

import torch

import nextmm
from nextmm.eval.images import held_out_scenes
from nextmm.worlds.shapes.generator import COLOURS, SHAPES
from nextmm.worlds.shapes.judge import objects_in_caption

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


def swapped(caption: str, first: str, second: str) -> str:
    return caption.replace(first, "\0").replace(second, first).replace("\0", second)


def binding_pairs(captions: list[str], seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """(caption, variant) pairs of two-object captions: their colours (shapes) swapped, or the first
    object's replaced by a third one."""
    rng = torch.Generator().manual_seed(seed)
    pairs: dict[str, list[tuple[str, str]]] = {f"{what}_{how}": [] for what in ("colour", "shape") for how in ("swap", "third")}
    for caption in captions:
        (_, colour1, shape1), (_, colour2, shape2) = objects_in_caption(caption)
        for what, first, second, values in (("colour", colour1, colour2, COLOURS), ("shape", shape1, shape2, SHAPES)):
            if first != second:
                others = [v for v in values if v not in (first, second)]
                third = others[int(torch.randint(len(others), (), generator=rng))]
                pairs[f"{what}_swap"].append((caption, swapped(caption, first, second)))
                pairs[f"{what}_third"].append((caption, caption.replace(first, third, 1)))
    return pairs


def binding(m, captions: list[str]) -> dict[str, dict[str, float]]:
    """Per view of the prompt (regression, read-out tokens), the mean distance for each kind of change and
    the swap / third ratios."""
    views: dict[str, dict[str, float]] = {}
    for kind, pairs in binding_pairs(captions).items():
        a, b = (m.regress([pair[i] for pair in pairs]).float() for i in (0, 1))
        found = {"regressed": (a, b)}
        if m.decoder is not None and m.decoder.semantic_width:
            unseen = torch.zeros(len(pairs), dtype=torch.bool)
            with torch.no_grad():
                sa, sb = m.decoder._semantic(a, unseen), m.decoder._semantic(b, unseen)
            found["semantic_whole"] = (sa[:, :1], sb[:, :1])
            if m.decoder.semantic_grid:
                found["semantic_cells"] = (sa[:, 1:], sb[:, 1:])
        for view, (x, y) in found.items():
            views.setdefault(view, {})[kind] = round(float((x - y).norm(dim=-1).mean()), 3)
    for distances in views.values():
        for what in ("colour", "shape"):
            distances[f"{what}_ratio"] = round(distances[f"{what}_swap"] / distances[f"{what}_third"], 2)
    return views


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--pictures", type=int, default=2000, help="held-out one-object pictures for CLIP's per-caption means")
    parser.add_argument("--two-object", type=int, default=150, help="held-out two-object captions for the binding check")
    args = parser.parse_args()
    m = nextmm.load(args.model)
    keys = list(CAPTIONS)
    regressed = m.regress([CAPTIONS[k] for k in keys]).float()
    results = {"regressed": separation(dict(zip(keys, regressed)))}
    if m.decoder is not None and m.decoder.semantic_width:
        with torch.no_grad():
            semantic = m.decoder._semantic(regressed, torch.zeros(len(keys), dtype=torch.bool))[:, 0]
        results["semantic_token"] = separation(dict(zip(keys, semantic)))
    if m.clip is not None:
        scenes = held_out_scenes(1, args.pictures)
        features = m.clip_image_features([image for _, image in scenes])
        by_caption: dict[str, list[torch.Tensor]] = {}
        for (caption, _), feature in zip(scenes, features):
            by_caption.setdefault(caption, []).append(feature)
        means = {k: torch.stack(by_caption[c]).mean(0) for k, c in CAPTIONS.items() if c in by_caption}
        results["clip_pictures"] = separation(means)
    results["binding"] = binding(m, [caption for caption, _ in held_out_scenes(2, args.two_object)])
    print(json.dumps({"model": args.model, **results}))


if __name__ == "__main__":
    main()

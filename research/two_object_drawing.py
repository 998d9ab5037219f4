"""Where two-object drawing goes wrong, for a model with a decoder: on held-out two-object Shapes World
scenes (seed 10007), the pixel judge on the decoder's reconstruction of each picture (from the picture's own
embeddings: the decoder alone) and on the drawing from its caption (the LLM's regression, then the
decoder). For each: both objects right (colour and shape, as the demo scores it), each named object right
on its own, the second object's colour drawn anywhere, how many objects the judge found, and, of the
captions naming two colours, the share drawn in one colour.

With `--placements K`, a third source: drawing from the mean of the picture's own embeddings over K random
placements of its objects that keep its caption (the conditional mean an L2 regression from the caption
aims at), given to the decoder as the LLM's regression is; with the distance of the LLM's regression to
it, and of one caption's mean to another's.

Usage: python research/two_object_drawing.py --model runs/demo/model [--scenes 100] [--guidance 3]
       [--placements 32]
Prints one JSON line per source (reconstruction, drawing, conditional_mean).
"""

import argparse
import collections
import json

import numpy as np
import torch

import nextmm
from nextmm.eval.images import held_out_scenes
from nextmm.worlds.shapes import generator as shapes
from nextmm.worlds.shapes.evaluation import EVAL_SEED
from nextmm.worlds.shapes.judge import objects_in_caption, score_prompt


def breakdown(images, captions) -> dict:
    wanted = [objects_in_caption(c) for c in captions]
    scored = [score_prompt(img, objects) for img, objects in zip(images, wanted)]
    judged = [s["judged"] for s in scored]
    found = collections.Counter(len(j) for j in judged)
    return {
        "both_right": float(np.mean([s["all_objects_right"] for s in scored])),
        "first_right": float(np.mean([s["objects"][0]["colour_shape"] for s in scored])),
        "second_right": float(np.mean([s["objects"][1]["colour_shape"] for s in scored])),
        "second_colour_drawn": float(np.mean([any(o[1] == w[1][1] for o in j) for j, w in zip(judged, wanted)])),
        "one_colour_only": float(np.mean([len({o[1] for o in j}) == 1 for j, w in zip(judged, wanted) if w[0][1] != w[1][1]])),
        "objects_found": {str(k): found[k] for k in sorted(found)},
    }


def placements(objects: list[shapes.Obj], caption: str, k: int, rng: np.random.Generator) -> list:
    """Up to k renders of these objects placed at random (each keeps its side) whose caption is `caption`."""
    renders = []
    for _ in range(20 * k):
        placed: list[shapes.Obj] = []
        for o in objects:
            box = shapes._place(rng, o.box[2] - o.box[0], [p.box for p in placed])
            if box is None:
                break
            placed.append(shapes.Obj(o.shape, o.colour, o.size, box))
        if len(placed) == len(objects) and shapes.Scene(placed).caption() == caption:
            renders.append(shapes.Scene(placed).image())
            if len(renders) == k:
                break
    return renders


def conditional_means(m, captions: list[str], k: int) -> torch.Tensor:
    """(n, N, width): for each held-out two-object caption (in held_out_scenes' order), the mean of the
    model's embeddings of k placements of its scene's objects that keep the caption."""
    scenes = (s for s in shapes.make_samples("caption", EVAL_SEED, 50 * len(captions)) if len(s.meta["objects"]) == 2)
    rng = np.random.default_rng(0)
    means = []
    for caption, scene in zip(captions, scenes):
        objects = [shapes.Obj.from_dict(o) for o in scene.meta["objects"]]
        means.append(m.embed_images(placements(objects, caption, k, rng)).mean(0))
    return torch.stack(means)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--placements", type=int, default=0)
    args = parser.parse_args()
    m = nextmm.load(args.model)
    scenes = held_out_scenes(2, args.scenes)
    captions = [c for c, _ in scenes]
    for source, images in (("reconstruction", m.reconstruct([img for _, img in scenes], guidance=args.guidance)),
                           ("drawing", m.draw(captions, guidance=args.guidance))):
        print(json.dumps({"model": args.model, "source": source, "scenes": args.scenes, "guidance": args.guidance,
                          **breakdown(images, captions)}), flush=True)
    if args.placements:
        means, regressed = conditional_means(m, captions, args.placements), m.regress(captions)
        guidance, steps = m._sampling(args.guidance, None)
        images = m._render(m.decoder, means, None, guidance, steps, seed=0)
        distance = lambda a, b: round(float((a - b).flatten(1).norm(dim=1).mean()), 3)  # noqa: E731
        print(json.dumps({"model": args.model, "source": "conditional_mean", "scenes": args.scenes, "placements": args.placements,
                          "regression_to_its_mean": distance(regressed, means), "mean_to_another_captions": distance(means, means.roll(1, 0)),
                          **breakdown(images, captions)}), flush=True)


if __name__ == "__main__":
    main()

"""Where two-object drawing goes wrong, for a model with a decoder: on held-out two-object Shapes World
scenes (seed 10007), the pixel judge on the decoder's reconstruction of each picture (from the picture's own
embeddings: the decoder alone) and on the drawing from its caption (the LLM's regression, then the
decoder). For each: both objects right (colour and shape, as the demo scores it), each named object right
on its own, the second object's colour drawn anywhere, how many objects the judge found, and, of the
captions naming two colours, the share drawn in one colour.

Usage: python benchmarks/two_object_drawing.py --model runs/demo/model [--scenes 100] [--guidance 3]
Prints one JSON line per source (reconstruction, drawing).
"""

import argparse
import collections
import json

import numpy as np

import nextmm
from nextmm.eval.images import held_out_scenes
from nextmm.eval.pixels import objects_in_caption, score_prompt


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--guidance", type=float, default=None)
    args = parser.parse_args()
    m = nextmm.load(args.model)
    scenes = held_out_scenes(2, args.scenes)
    captions = [c for c, _ in scenes]
    for source, images in (("reconstruction", m.reconstruct([img for _, img in scenes], guidance=args.guidance)),
                           ("drawing", m.draw(captions, guidance=args.guidance))):
        print(json.dumps({"model": args.model, "source": source, "scenes": args.scenes, "guidance": args.guidance,
                          **breakdown(images, captions)}), flush=True)


if __name__ == "__main__":
    main()

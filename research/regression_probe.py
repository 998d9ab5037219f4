"""What the LLM's regressed image says about its prompt: linear (ridge, one-hot) probes that read each named
object's colour and shape from the N embeddings the LLM regresses after a caption and `[IMG]`, fitted on
captions of training seeds and scored on held-out ones, beside the same probes on the embeddings the
visual stack makes of the captions' own pictures. A probe near 1 on the regressed embeddings with drawing
still near chance puts the fault in the decoder, not in the LLM. Also the regressed embeddings' spread
across prompts (the mean per-dimension standard deviation) beside the real pictures'.

Usage: python research/regression_probe.py --model runs/demo/model [--train 1500] [--test 400]
Prints one JSON line.
"""

import argparse
import json

import numpy as np

import nextmm
from nextmm.eval.images import held_out_scenes
from nextmm.worlds.shapes.generator import COLOURS, SHAPES
from nextmm.worlds.shapes.judge import objects_in_caption

TRAINING_SEED = 123  # not the held-out seed: the probes are fitted on scenes the scores never see


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, classes: int, ridge: float = 10.0) -> float:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a = np.c_[(train_x - mean) / std, np.ones(len(train_x))]
    b = np.c_[(test_x - mean) / std, np.ones(len(test_x))]
    weights = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ np.eye(classes)[train_y])
    return float(((b @ weights).argmax(1) == test_y).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", type=int, default=1500, help="captions of each object count to fit the probes on")
    parser.add_argument("--test", type=int, default=400, help="held-out captions of each object count to score them on")
    args = parser.parse_args()
    m = nextmm.load(args.model)
    embeddings = {
        "regressed": lambda scenes: m.regress([caption for caption, _ in scenes]).flatten(1).numpy(),
        "real": lambda scenes: m.embed_images([image for _, image in scenes]).flatten(1).numpy(),
    }
    results = {}
    for count in (1, 2):
        fit, scored = held_out_scenes(count, args.train, TRAINING_SEED), held_out_scenes(count, args.test)
        labels = {}  # (object k, what) -> (classes, the fitted scenes' labels, the scored scenes')
        for k in range(count):
            for what, names, field in (("colour", list(COLOURS), 1), ("shape", list(SHAPES), 2)):
                labels[k, what] = len(names), *(np.array([names.index(objects_in_caption(c)[k][field]) for c, _ in scenes]) for scenes in (fit, scored))
        for name, embed in embeddings.items():
            fit_x, scored_x = embed(fit), embed(scored)
            results[f"{count}obj_{name}_spread"] = round(float(scored_x.std(0).mean()), 3)
            for (k, what), (classes, fit_y, scored_y) in labels.items():
                results[f"{count}obj_{name}_object{k + 1}_{what}"] = round(probe_accuracy(fit_x, fit_y, scored_x, scored_y, classes), 3)
    print(json.dumps({"model": args.model, "train": args.train, "test": args.test, **results}))


if __name__ == "__main__":
    main()

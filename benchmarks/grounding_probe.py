"""Where grounding loses an object's place: ridge probes read the centre of the object a grounding
question names, in pixels, from (a) the image's visual embeddings, all N together, (b) the one visual
embedding that differs most from its slot's mean (in one-object scenes, the object's own), and (c) the
LLM's hidden state where it writes the box's first location token. For each object count (1, 2, 3)
a probe trains on 1200 held-out questions about scenes of that count and is scored on 300 more (median
L1 error of the centre, x plus y, in pixels), beside a constant guess. The visual probes cannot know
which object a question names, so only their one-object figures say what the embeddings hold.

Usage: python benchmarks/grounding_probe.py --model runs/demo/model
Prints one JSON object.
"""

import argparse
import json

import numpy as np
import torch

import nextmm
from nextmm.data import shapes
from nextmm.data.sample import Image, Text, grounding_question
from nextmm.generate import Stepper

TRAIN, TEST = 1200, 300


def questions(n: int, objects: int, seed: int = 77) -> tuple[list, np.ndarray]:
    """n (image, phrase) grounding prompts about scenes of `objects` objects, with the named object's centre."""
    prompts, centres, i = [], [], 0
    while len(prompts) < n:
        scene = shapes.sample_scene(np.random.default_rng([seed, i]))
        i += 1
        if len(scene.objects) != objects:
            continue
        phrase, (x0, y0, x1, y1) = scene.grounding()[0]
        prompts.append([Image(scene.image()), Text(grounding_question(phrase), target=False)])
        centres.append(((x0 + x1) / 2, (y0 + y1) / 2))
    return prompts, np.array(centres)


@torch.no_grad()
def features(m, prompts: list) -> dict[str, np.ndarray]:
    visual, hidden = [], []
    for start in range(0, len(prompts), 100):
        batch = m.builder.collate([m.builder.encode(p, close=False) for p in prompts[start:start + 100]], left_pad=True)
        visual.append(m.model.encode_images(batch["pixels"]).float())
        hidden.append(Stepper(m.model, batch, 1, True, "fp32").prefill().float())
    visual = torch.cat(visual)
    deviation = (visual - visual.mean(0, keepdim=True)).norm(dim=-1)
    own = visual[torch.arange(len(visual)), deviation.argmax(1)]
    return {"visual_all": visual.flatten(1).numpy(), "visual_one": own.numpy(), "llm_hidden": torch.cat(hidden).numpy()}


def probe_error(x: np.ndarray, y: np.ndarray, ridge: float = 1.0) -> np.ndarray:
    """Per test row, the L1 error of a ridge regression fit on the first TRAIN rows."""
    x = np.c_[x, np.ones(len(x))]
    train, test = slice(0, TRAIN), slice(TRAIN, None)
    w = np.linalg.solve(x[train].T @ x[train] + ridge * np.eye(x.shape[1]), x[train].T @ y[train])
    return np.abs(x[test] @ w - y[test]).sum(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    m = nextmm.load(args.model)
    out: dict = {"model": args.model}
    for objects in (1, 2, 3):
        prompts, centres = questions(TRAIN + TEST, objects)
        guess = np.abs(centres[TRAIN:] - centres[:TRAIN].mean(0)).sum(1)
        found = {"constant": guess, **{name: probe_error(x, centres) for name, x in features(m, prompts).items()}}
        for name, errors in found.items():
            out.setdefault(name, {})[f"{objects}_objects"] = round(float(np.median(errors)), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

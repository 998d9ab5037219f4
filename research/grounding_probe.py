"""Where grounding loses an object's place: ridge probes read the centre of the object a grounding
question names, in pixels, from (a) the image's visual embeddings, all N together, (b) the one visual
embedding that differs most from its slot's mean (in one-object scenes, the object's own), and (c) the
LLM's hidden state where it writes the box's first location token. For each object count (1, 2, 3)
a probe trains on 1200 held-out questions about scenes of that count and is scored on 300 more (median
L1 error of the centre, x plus y, in pixels), beside a constant guess. The visual probes cannot know
which object a question names, so only their one-object figures say what the embeddings hold.
With a location pointer (`heads.pointer`), also where it looks at that state: the miss of its
attention-weighted patch position (median L1 to the centre, pixels) and its attention's share on the
patches whose centre lies in the named object's box. And the model's own answers' Acc@0.5 on the 300
held-out questions of each count, beside the same answers read as before session 19, averaging the
pointer's attention over the whole grid (`whole_grid_read`) rather than around its peak; how often that
peak lies in the named object's box, and both reads' Acc@0.5 on those questions (`..._peak_on_object`).

Usage: python research/grounding_probe.py --model runs/demo/model
Prints one JSON object.
"""

import argparse
import json

import numpy as np
import torch

import nextmm
from nextmm.data.sample import Image, Text, grounding_question
from nextmm.eval.metrics import grounding_accuracy
from nextmm.generate import Stepper
from nextmm.heads.location import Pointing
from nextmm.worlds.shapes import generator as shapes

TRAIN, TEST = 1200, 300


def questions(n: int, objects: int, seed: int = 77) -> tuple[list, list[str], np.ndarray]:
    """n grounding prompts (image, question) about scenes of `objects` objects, the phrases they quote, and
    the named objects' boxes."""
    prompts, phrases, boxes, i = [], [], [], 0
    while len(prompts) < n:
        scene = shapes.sample_scene(np.random.default_rng([seed, i]))
        i += 1
        if len(scene.objects) != objects:
            continue
        phrase, box = scene.grounding()[0]
        prompts.append([Image(scene.image()), Text(grounding_question(phrase), target=False)])
        phrases.append(phrase)
        boxes.append(box)
    return prompts, phrases, np.array(boxes, dtype=float)


def prefilled(m, prompts: list, batch_size: int = 100):
    """Per batch of prompts: the batch, its Stepper and the LLM's hidden state where x0 would be written."""
    for start in range(0, len(prompts), batch_size):
        batch = m.builder.collate([m.builder.encode(p, close=False) for p in prompts[start:start + batch_size]], left_pad=True)
        stepper = Stepper(m.model, batch, 1, True, "fp32")
        yield batch, stepper, stepper.prefill().float()


@torch.no_grad()
def features(m, prompts: list) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The probes' inputs, and the pointer's attention over the patches where x0 is written (None without one)."""
    visual, hidden, looks = [], [], []
    pointer = getattr(m.model.heads.location if "location" in m.model.heads else None, "pointer", None)
    for batch, stepper, state in prefilled(m, prompts):
        visual.append(m.model.encode_images(batch["pixels"]).float())
        hidden.append(state)
        if pointer is not None:
            sight = next(s for s in stepper.states if isinstance(s, Pointing)).sight
            looks.append(pointer.attention(state, sight.patches, sight.image_index, sight.words))
    visual = torch.cat(visual)
    deviation = (visual - visual.mean(0, keepdim=True)).norm(dim=-1)
    own = visual[torch.arange(len(visual)), deviation.argmax(1)]
    probed = {"visual_all": visual.flatten(1).numpy(), "visual_one": own.numpy(), "llm_hidden": torch.cat(hidden).numpy()}
    return probed, torch.cat(looks).numpy() if looks else None


def pointer_looks(m, attention: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per question: the L1 miss (pixels) of the attention-weighted patch centre, the attention's share on
    patches whose centre is inside the box, and whether its peak (PatchPointer.around_peak) is inside."""
    pointer = m.model.heads.location.pointer
    where = (pointer.where.numpy() + 0.5) * m.config.vision.image_size  # (P, 2) pixels
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    miss = np.abs(attention @ where - centres).sum(1)
    inside = ((where[None] >= boxes[:, None, :2]) & (where[None] <= boxes[:, None, 2:])).all(-1)
    peak = pointer.around_peak(torch.from_numpy(attention)).argmax(-1).numpy()
    return miss, (attention * inside).sum(1), inside[np.arange(len(peak)), peak]


def whole_grid_answers(m, images: list, phrases: list[str]) -> list:
    """m.ground's boxes with the pointer reading its attention over the whole grid, as before session 19."""
    pointer = m.model.heads.location.pointer
    pointer.around_peak = lambda attention: attention
    try:
        return m.ground(images, phrases)
    finally:
        del pointer.around_peak


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
        prompts, phrases, boxes = questions(TRAIN + TEST, objects)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        guess = np.abs(centres[TRAIN:] - centres[:TRAIN].mean(0)).sum(1)
        probed, attention = features(m, prompts)
        found = {"constant": guess, **{name: probe_error(x, centres) for name, x in probed.items()}}
        if attention is not None:
            miss, share, peak_inside = pointer_looks(m, attention[TRAIN:], boxes[TRAIN:])
            found["pointer_looks"] = miss
            out.setdefault("pointer_share_on_object", {})[f"{objects}_objects"] = round(float(share.mean()), 3)
            out.setdefault("pointer_peak_on_object", {})[f"{objects}_objects"] = round(float(peak_inside.mean()), 3)
        images, told = [p[0].image for p in prompts[TRAIN:]], boxes[TRAIN:].tolist()
        answers = m.ground(images, phrases[TRAIN:])
        out.setdefault("acc_at_0.5", {})[f"{objects}_objects"] = round(grounding_accuracy(answers, told), 3)
        if attention is not None:
            whole = whole_grid_answers(m, images, phrases[TRAIN:])
            out.setdefault("acc_at_0.5_whole_grid_read", {})[f"{objects}_objects"] = round(grounding_accuracy(whole, told), 3)
            for name, read in (("acc_at_0.5_peak_on_object", answers), ("acc_at_0.5_whole_grid_read_peak_on_object", whole)):
                on = [(a, b) for a, b, inside in zip(read, told, peak_inside) if inside]
                out.setdefault(name, {})[f"{objects}_objects"] = round(grounding_accuracy(*map(list, zip(*on))), 3) if on else None
        for name, errors in found.items():
            out.setdefault(name, {})[f"{objects}_objects"] = round(float(np.median(errors)), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

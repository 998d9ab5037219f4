"""Why a model's detection lists fewer objects than the picture holds: on held-out Shapes World detection
scenes (seed 10007), the margin of a comma (go on) over the end after each true object's phrase and box,
teacher-forced, by how many objects the scene has; then detection F1 and objects listed per picture as
`m.detect` decodes (the model ends where it likes), with the list held to the true count, and held to
the count the model itself answers to `how many objects are there?`, each also with repeats forbidden
(`distinct_`: no object named twice, as Shapes World never holds two of one colour and shape).

A model that ends after its first box whatever the count has a negative margin everywhere; one that
repeats its first object when made to go on gains nothing from a count, even the true one; one that,
kept from repeating, still gains nothing does not know what else the picture holds.

Usage: python research/detection_listing.py --model runs/demo/model [--scenes 80]
Prints one JSON object."""

import argparse
import json

import numpy as np
import torch

import nextmm
from nextmm.constrained import DetectionGrammar
from nextmm.data.sample import DETECT_QUESTION, Text
from nextmm.generate import generate_ids, next_token_logits
from nextmm.worlds.shapes import generator as shapes
from nextmm.worlds.shapes.evaluation import EVAL_SEED, detection_f1

COUNTS = ("one", "two", "three")  # Shapes World scenes hold 1 to 3 objects


class CountedDetection(DetectionGrammar):
    """The detection grammar, but each row goes on after a box until it has listed its given count; with
    `distinct`, a phrase may not be written again (its last word, or its box after it, is masked)."""

    def __init__(self, tokenizer, depth: int, counts: list[int], distinct: bool = False):
        super().__init__(tokenizer, depth)
        self.counts, self.distinct = counts, distinct

    def restrict(self, logits: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
        logits = super().restrict(logits, written)
        for row, prefix in enumerate(written.tolist()):
            boxes = sum(t in self.index for t in prefix)
            if boxes and boxes % 4 == 0 and prefix[-1] in self.index:  # a box just closed: a comma or the end, as counted
                keep = self.comma[0] if boxes // 4 < self.counts[row] else self.eos
                logits[row, [t for t in (self.comma[0], self.eos) if t != keep]] = float("-inf")
            elif self.distinct and boxes % 4 == 0:
                kept = logits[row].clone()
                kept[self._repeating(prefix)] = float("-inf")
                if torch.isfinite(kept).any():  # a phrase the grammar can only close stays as it is
                    logits[row] = kept
        return logits

    def _repeating(self, prefix: list[int]) -> list[int]:
        """The tokens that would end, with the open phrase, a phrase already listed."""
        listed, words = [], []
        for t in prefix:
            if t not in self.index:
                words.append(t)
            elif words:
                listed.append(tuple(words[len(self.comma) :] if listed else words))  # past the comma before it
                words = []
        open_phrase = tuple(words[len(self.comma) :] if listed else words)
        last_words = [p[-1] for p in listed if p[:-1] == open_phrase]
        return last_words + (list(self.bins) if open_phrase in listed else [])


def comma_margins(m, scenes, prompts) -> dict[str, float]:
    """Teacher-forced: after the first j objects of each scene's answer, comma minus end, by object count."""
    grammar = DetectionGrammar(m.tokenizer, 1)
    out = {}
    for count in (1, 2, 3):
        for j in range(1, count + 1):
            margins = []
            for scene, prompt in zip(scenes, prompts):
                listed = scene.segments[2].text.split(", ")
                if len(listed) == count:
                    logits = next_token_logits(m.model, m.builder, [prompt], then=m.tokenizer.encode(", ".join(listed[:j])))[0]
                    margins.append(float(logits[grammar.comma[0]] - logits[grammar.eos]))
            out[f"comma_margin_{count}obj_after_{j}"] = round(float(np.mean(margins)), 3)
    return out


def listing(m, prompts, truth, counts, distinct: bool = False) -> dict[str, float]:
    rows = []
    for start in range(0, len(prompts), m.batch_size):  # batched as NextMM.generate_ids does, each row with its count
        part = slice(start, start + m.batch_size)
        grammar = CountedDetection(m.tokenizer, 64, counts[part], distinct)
        rows += generate_ids(m.model, m.builder, prompts[part], 64, precision=m.precision, answers=grammar)
    listed = [m.tokenizer.phrases_with_boxes(r, 64) for r in rows]
    return {"f1": round(detection_f1(listed, truth), 4), "listed_per_picture": round(float(np.mean([len(x) for x in listed])), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--scenes", type=int, default=80)
    args = parser.parse_args()
    m = nextmm.load(args.model)
    scenes = list(shapes.make_samples("detect", EVAL_SEED, args.scenes))
    truth = [s.meta["objects"] for s in scenes]
    prompts = [[s.segments[0], Text(DETECT_QUESTION, target=False)] for s in scenes]
    pictures = [s.segments[0].image for s in scenes]
    own = m.detect(pictures)
    said = m.ask(pictures, ["how many objects are there?"] * len(scenes), answers=list(COUNTS))
    true_counts, model_counts = [len(t) for t in truth], [COUNTS.index(a) + 1 for a in said]
    print(json.dumps({
        "model": args.model, "scenes": len(scenes), "objects_per_picture": round(float(np.mean(true_counts)), 3),
        **comma_margins(m, scenes, prompts),
        "own_f1": round(detection_f1(own, truth), 4), "own_listed_per_picture": round(float(np.mean([len(x) for x in own])), 3),
        "count_accuracy": round(float(np.mean(np.array(model_counts) == np.array(true_counts))), 3),
        **{f"true_count_{k}": v for k, v in listing(m, prompts, truth, true_counts).items()},
        **{f"model_count_{k}": v for k, v in listing(m, prompts, truth, model_counts).items()},
        **{f"distinct_true_count_{k}": v for k, v in listing(m, prompts, truth, true_counts, distinct=True).items()},
        **{f"distinct_model_count_{k}": v for k, v in listing(m, prompts, truth, model_counts, distinct=True).items()},
    }))


if __name__ == "__main__":
    main()

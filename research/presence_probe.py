"""Whether a model knows what is in a picture and what is not: its presence probe (models/emu.py,
PresenceProbe) asked on held-out Shapes World scenes about a phrase of the picture ("a small red circle"),
about that phrase with its colour or its shape changed to a pair the scene lacks (image-text matching's
negatives), and, in scenes of two or more objects, about one object's colour with another's shape (both
words are in the picture, not together); and how the model answers with it: image-text matching accuracy
(and how often it said yes), uncalibrated and calibrated (NextMM.match), and VQA's "is there a {colour}
{shape}?" accuracy, each with the AUC of the model's yes-minus-no logit margin (what it knows, however its
threshold lies); and, for a model with an agreement judge (models/agreement.py), its verdict's AUC and
accuracy on the matching questions, beside the AUC of the lowest of the probe's reads at the questions' shape
words (where a judge that knew where phrases end would look). Models without a probe get the matching and "is there" figures alone.

Usage: python research/presence_probe.py --model runs/demo/model [--scenes 300]
Prints one JSON object.
"""

import argparse
import itertools
import json

import numpy as np
import torch

import nextmm
from nextmm.data.sample import Image, Text, matching_question, vqa_prompt
from nextmm.generate import Stepper
from nextmm.heads.agreement import Judging
from nextmm.heads.words import Words
from nextmm.worlds.shapes import generator as shapes
from nextmm.worlds.shapes.evaluation import EVAL_SEED, matching_answers


def auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """The chance that a phrase in the picture scores above one that is not (ties count half)."""
    pos, neg = scores[truth], scores[~truth]
    return float(np.mean(pos[:, None] > neg[None, :]) + 0.5 * np.mean(pos[:, None] == neg[None, :]))


def phrases(scenes: int, seed: int) -> list[tuple[object, str, str]]:
    """(picture, phrase, kind): kind "present", "changed" (one word to a pair the scene lacks) or "swapped"."""
    out = []
    for i in range(scenes):
        rng = np.random.default_rng([seed, i])
        scene = shapes.sample_scene(rng)
        picture, taken = scene.image(), {(o.colour, o.shape) for o in scene.objects}
        first = scene.objects[0]
        out.append((picture, first.phrase, "present"))
        changed = shapes._mismatched(rng, shapes.Scene([first]))
        if (changed.objects[0].colour, changed.objects[0].shape) not in taken:
            out.append((picture, changed.objects[0].phrase, "changed"))
        for a, b in itertools.permutations(scene.objects, 2):
            if (a.colour, b.shape) not in taken:
                out.append((picture, shapes.Obj(b.shape, a.colour, a.size, a.box).phrase, "swapped"))
                break
    return out


@torch.no_grad()
def presence(m, asked: list[tuple[object, str, str]]) -> np.ndarray:
    """(n,) the probe's probability that each phrase is in its picture."""
    model, out = m.model, []
    for start in range(0, len(asked), 100):
        part = asked[start:start + 100]
        batch = m.builder.collate([m.builder.encode([Image(p)], close=False) for p, _, _ in part])
        visual, _ = model.see(batch["pixels"])
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(m.tokenizer.encode(t)) for _, t, _ in part], batch_first=True, padding_value=-1)
        bags = Words.mean(model.heads.words(model.llm.embed_tokens).phrase_bags_of(ids))
        out.append(torch.sigmoid(model.heads.presence.phrase_logits(bags, visual, torch.arange(len(part)))))
    return torch.cat(out).numpy()


@torch.no_grad()
def yes_margins(m, prompts: list) -> tuple[np.ndarray, np.ndarray | None]:
    """(n,) the next token's yes-minus-no logit after each prompt, and (n,) the agreement judge's verdict there
    (its logit that all said since the picture holds; None without a judge)."""
    yes, no = m.tokenizer.encode("yes")[0], m.tokenizer.encode("no")[0]
    margins, verdicts = [], []
    for start in range(0, len(prompts), 100):
        batch = m.builder.collate([m.builder.encode(p, close=False) for p in prompts[start:start + 100]], left_pad=True)
        stepper = Stepper(m.model, batch, 1, True, "fp32")
        logits = stepper.logits(stepper.prefill())
        margins.append((logits[:, yes] - logits[:, no]).numpy())
        judging = next((state for state in stepper.states if isinstance(state, Judging)), None)
        if judging is not None:
            verdicts.append(m.model.heads.agreement.verdict(judging.sums).numpy())
    return np.concatenate(margins), np.concatenate(verdicts) if verdicts else None


@torch.no_grad()
def lowest_read_at_shape_words(m, prompts: list) -> np.ndarray:
    """(n,) the lowest of the probe's reads at the prompts' shape words (where Shapes World's phrases end): what
    a judge that knew where phrases end would see."""
    model = m.model
    shape_ids = torch.tensor([m.tokenizer.encode(f" {shape}")[-1] for shape in shapes.SHAPES])
    out = []
    for start in range(0, len(prompts), 100):
        batch = m.builder.collate([m.builder.encode(p, close=False) for p in prompts[start:start + 100]])
        ids = batch["input_ids"]
        visual, _ = model.see(batch["pixels"])
        reading = model.read(ids, visual)
        model.heads.input(reading)
        seen, reads = reading.notes["presence"]
        out.append(reads.masked_fill(~(seen & torch.isin(ids, shape_ids)), float("inf")).amin(1).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--scenes", type=int, default=300)
    args = parser.parse_args()
    m = nextmm.load(args.model)
    report: dict = {"scenes": args.scenes}
    if "presence" in m.model.heads:
        asked = phrases(args.scenes, seed=77)
        p = presence(m, asked)
        kinds = np.array([k for _, _, k in asked])
        for kind in ("changed", "swapped"):
            keep = (kinds == "present") | (kinds == kind)
            truth = kinds[keep] == "present"
            report[f"probe_auc_present_vs_{kind}"] = round(auc(p[keep], truth), 4)
            report[f"probe_accuracy_present_vs_{kind}"] = round(float(np.mean((p[keep] > 0.5) == truth)), 4)
        report["probe_phrases"] = {k: int((kinds == k).sum()) for k in ("present", "changed", "swapped")}
    said, said_calibrated, truth = matching_answers(m, 200, EVAL_SEED)
    report["itm_accuracy"] = round(float(np.mean(said == truth)), 4)
    report["itm_said_yes"] = round(float(np.mean(said)), 4)
    report["itm_calibrated_accuracy"] = round(float(np.mean(said_calibrated == truth)), 4)
    report["itm_calibrated_said_yes"] = round(float(np.mean(said_calibrated)), 4)
    pairs = list(shapes.make_samples("itm", EVAL_SEED, 200))  # the pairs matching_answers asked
    questions = [[s.segments[0], Text(matching_question(s.meta["caption"]), target=False)] for s in pairs]
    margins, verdicts = yes_margins(m, questions)
    report["itm_margin_auc"] = round(auc(margins, truth), 4)
    if "presence" in m.model.heads:
        report["itm_lowest_read_at_shape_words_auc"] = round(auc(lowest_read_at_shape_words(m, questions), truth), 4)
    if verdicts is not None:
        report["itm_judge_auc"] = round(auc(verdicts, truth), 4)
        report["itm_judge_accuracy"] = round(float(np.mean((verdicts > 0) == truth)), 4)
    exists = [s for s in shapes.make_samples("vqa", EVAL_SEED, 1600) if s.meta.get("template") == "exists"][:200]
    answers = m.ask([s.segments[0].image for s in exists], [s.meta["question"] for s in exists], answers=["yes", "no"])
    there = np.array([s.segments[2].text == "yes" for s in exists])
    report["exists_accuracy"] = round(float(np.mean([a == s.segments[2].text for a, s in zip(answers, exists)])), 4)
    margins, _ = yes_margins(m, [[s.segments[0], Text(vqa_prompt(s.meta["question"]), target=False)] for s in exists])
    report["exists_margin_auc"] = round(auc(margins, there), 4)
    report["exists_questions"] = len(exists)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

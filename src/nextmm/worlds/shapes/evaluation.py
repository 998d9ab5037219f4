"""Score a model on held-out Shapes World: captions (exact match, BLEU-4, CIDEr), VQA accuracy (overall and
per template), video QA (direction, colour, shape of the mover), few-shot binding, the OFA-style tasks
(grounding, image-text matching, region captions) and image-text retrieval with the CLIP stage; `results_table` writes them as Markdown.

Held-out means another seed than the training data: every sample is drawn from
`default_rng([seed, index, kind])`, so seed 0 (training) and the evaluation seed share no stream.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nextmm.api import NextMM
from nextmm.data.sample import Image, Sample, Text, Video
from nextmm.eval.fewshot import binding_scores
from nextmm.eval.metrics import box_iou, box_misses, caption_scores, grounding_accuracy, retrieval_recall
from nextmm.worlds.shapes import generator as shapes

EVAL_SEED = 10_007


def _first(sample: Sample, kind: type):
    return next(seg for seg in sample.segments if isinstance(seg, kind))


def _accuracy(preds: list[str], refs: list[str]) -> float:
    return float(np.mean([p.strip() == r.strip() for p, r in zip(preds, refs)])) if refs else 0.0


def _per_template(samples: list[Sample], preds: list[str]) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for sample, pred in zip(samples, preds):
        groups[sample.meta["template"]].append(pred.strip() == sample.meta["answer"])
    return {name: round(float(np.mean(hits)), 4) for name, hits in sorted(groups.items())}


def evaluate_captions(m: NextMM, n: int, seed: int) -> tuple[dict[str, Any], list[dict]]:
    samples = list(shapes.make_samples("caption", seed, n))
    refs = [_first(s, Text).text for s in samples]
    preds = m.caption([_first(s, Image).image for s in samples])
    examples = [{"image": _first(s, Image).image, "truth": r, "prediction": p} for s, r, p in zip(samples, refs, preds)]
    # one reference per scene, punctuation-free: the simple tokenizer is exact here and needs no Java
    scores = caption_scores(dict(enumerate(preds)), {i: [r] for i, r in enumerate(refs)}, tokenizer="simple", meteor=False)
    return {
        "caption_exact_match": round(_accuracy(preds, refs), 4), "caption_bleu4": round(scores["BLEU-4"], 4),
        "caption_cider": round(scores["CIDEr"], 4), "caption_scenes": n,
    }, examples


def evaluate_retrieval(m: NextMM, n: int, seed: int) -> dict[str, float]:
    """CLIP-stage retrieval among n held-out scenes and their distinct captions; scenes that share a
    caption are all right answers for it."""
    samples = list(shapes.make_samples("caption", seed, n))
    captions = [_first(s, Text).text for s in samples]
    texts = sorted(set(captions))
    relevant = torch.tensor([[c == t for t in texts] for c in captions])
    similarity = m.clip_image_features([_first(s, Image).image for s in samples]) @ m.clip_text_features(texts).T
    recall = retrieval_recall(similarity, relevant, ks=(1, 5))
    return {f"retrieval_{k.replace('@', '_at_')}": round(v, 4) for k, v in recall.items()} | {"retrieval_texts": len(texts)}


def evaluate_vqa(m: NextMM, n_scenes: int, seed: int) -> tuple[dict[str, Any], list[dict]]:
    samples = list(shapes.make_samples("vqa", seed, n_scenes))
    preds = m.ask([_first(s, Image).image for s in samples], [s.meta["question"] for s in samples])
    examples = [
        {"image": _first(s, Image).image, "question": s.meta["question"], "truth": s.meta["answer"], "prediction": p}
        for s, p in zip(samples, preds)
    ]
    return {
        "vqa_accuracy": round(_accuracy(preds, [s.meta["answer"] for s in samples]), 4),
        "vqa_per_template": _per_template(samples, preds),
        "vqa_questions": len(samples),
    }, examples


def evaluate_video(m: NextMM, n_videos: int, seed: int) -> tuple[dict[str, Any], list[dict]]:
    samples = list(shapes.make_samples("video_qa", seed, n_videos))
    preds = m.ask([_first(s, Video).frames for s in samples], [s.meta["question"] for s in samples])
    per = _per_template(samples, preds)
    captions = list(shapes.make_samples("video_caption", seed, n_videos))
    cap_preds = m.caption([_first(s, Video).frames for s in captions])
    examples = [
        {"frames": _first(s, Video).frames, "question": s.meta["question"], "truth": s.meta["answer"], "prediction": p}
        for s, p in zip(samples, preds)
    ]
    return {
        "video_direction_accuracy": per.get("direction", 0.0),
        "video_qa_per_template": per,
        "video_caption_exact_match": round(_accuracy(cap_preds, [_first(s, Text).text for s in captions]), 4),
        "videos": n_videos,
    }, examples


def matching_answers(m: NextMM, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image-text matching on n held-out samples (half the texts describe the image): (n,) whether the model
    said yes as `NextMM.match` does, (n,) whether it said yes calibrated, and (n,) whether the text does
    describe its image. Each pair's margin is computed once for both."""
    samples = list(shapes.make_samples("itm", seed, n))
    images = [_first(s, Image).image for s in samples]
    margins = m.match_margins(images, [s.meta["caption"] for s in samples])
    bias = m.match_margins(images, [""] * len(samples))
    return (margins > 0).numpy(), (margins - bias > 0).numpy(), np.array([s.meta["answer"] == "yes" for s in samples])


def evaluate_instructions(m: NextMM, n: int, seed: int) -> dict[str, Any]:
    """OFA-style tasks on n held-out samples each: grounding (Acc@0.5), image-text matching (accuracy;
    half the texts describe the image), detection (F1) and region captioning (exact match)."""
    ground = list(itertools.islice(shapes.make_samples("ground", seed, n), n))
    boxes = m.ground([_first(s, Image).image for s in ground], [s.meta["phrase"] for s in ground])
    said, said_calibrated, truth = matching_answers(m, n, seed)
    detect = list(shapes.make_samples("detect", seed, n))
    listed = m.detect([_first(s, Image).image for s in detect])
    regions = list(shapes.make_samples("region_caption", seed, n))
    phrases = m.generate([s.segments[:2] for s in regions], max_new_tokens=8)
    return {
        "grounding_acc_at_0.5": round(grounding_accuracy(boxes, [s.meta["box"] for s in ground]), 4),
        "grounding_centre_miss_px": round(float(np.median([box_misses(b, s.meta["box"])[0] for b, s in zip(boxes, ground)])), 2),
        "itm_accuracy": round(float(np.mean(said == truth)), 4),
        "itm_calibrated_accuracy": round(float(np.mean(said_calibrated == truth)), 4),
        "region_caption_exact_match": round(_accuracy(phrases, [s.segments[2].text for s in regions]), 4),
        "detection_f1": round(detection_f1(listed, [s.meta["objects"] for s in detect]), 4),
    }


def detection_f1(listed: list[list[tuple[str, tuple]]], truth: list[list[dict]]) -> float:
    """F1 over all images of listed objects: right when its phrase names a true object of the image and its box
    overlaps that object's at IoU >= 0.5 (each true object matched once)."""
    hits = found = wanted = 0
    for objects, true in zip(listed, truth):
        unmatched = [(shapes.Obj.from_dict(o).phrase, o["box"]) for o in true]
        found, wanted = found + len(objects), wanted + len(true)
        for phrase, box in objects:
            match = next((t for t in unmatched if t[0] == phrase and box_iou(box, t[1]) >= 0.5), None)
            if match is not None:
                unmatched.remove(match)
                hits += 1
    return 2 * hits / (found + wanted) if found + wanted else 0.0


def evaluate_binding(m: NextMM, n: int, seed: int, shots: int) -> dict[str, float]:
    """The spec's binding test, `n` prompts of `shots` shots: {"binding_{shots}shot_" + accuracy, choice_accuracy,
    chance} (eval/fewshot.py's binding_scores)."""
    prompts, answers = [], []
    for index in range(n):
        segments, answer = shapes.binding_fewshot(np.random.default_rng([seed, index, shots]), shots)
        prompts.append(segments)
        answers.append(answer)
    return {f"binding_{shots}shot_{key}": round(value, 4) for key, value in binding_scores(m, prompts, answers).items()}


def evaluate(m: NextMM, scenes: int = 500, videos: int = 200, binding: int = 100, seed: int = EVAL_SEED) -> dict[str, Any]:
    """All Shapes World figures, plus a few worked examples for the report (under "examples")."""
    with tqdm(total=6, desc="held-out Shapes World", unit="part") as bar:
        def part(name: str, result):
            bar.set_postfix_str(name)
            bar.update()
            return result

        captions, cap_examples = part("captions", evaluate_captions(m, scenes, seed))
        vqa, vqa_examples = part("vqa", evaluate_vqa(m, scenes, seed))
        video, video_examples = part("video", evaluate_video(m, videos, seed))
        fewshot = part("binding", {**evaluate_binding(m, binding, seed, 2), **evaluate_binding(m, binding, seed, 4)})
        instructions = part("instructions", evaluate_instructions(m, max(1, scenes // 5), seed))
        retrieval = part("retrieval", evaluate_retrieval(m, scenes, seed) if m.clip is not None else {})
    return {
        **captions, **vqa, **video, **fewshot, **instructions, **retrieval, "seed": seed,
        "examples": {
            "captions": cap_examples[:12],
            "vqa": list(itertools.islice(vqa_examples, 0, 48, 4)),
            "video": video_examples[:6],
        },
    }


# (result key, what it measures, the target issue 4 sets, if any)
TABLE_ROWS = [
    ("caption_exact_match", "captions: exact match", ""),
    ("caption_bleu4", "captions: BLEU-4", ""),
    ("caption_cider", "captions: CIDEr", ""),
    ("vqa_accuracy", "VQA accuracy", ""),
    ("video_direction_accuracy", "video QA: direction", ""),
    ("video_caption_exact_match", "video captions: exact match", ""),
    ("binding_2shot_accuracy", "binding, 2 shots: the next word", ""),
    ("binding_2shot_choice_accuracy", "binding, 2 shots: the word chosen among those shown", ""),
    ("binding_2shot_chance", "binding, 2 shots: chance of that choice", ""),
    ("binding_4shot_accuracy", "binding, 4 shots: the next word", ">= 0.60"),
    ("binding_4shot_choice_accuracy", "binding, 4 shots: the word chosen among those shown", "well above chance"),
    ("binding_4shot_chance", "binding, 4 shots: chance of that choice", ""),
    ("grounding_acc_at_0.5", "grounding: Acc@0.5", ">= 0.70"),
    ("grounding_centre_miss_px", "grounding: median centre miss (px, x + y)", ""),
    ("itm_accuracy", "image-text matching: accuracy", ""),
    ("itm_calibrated_accuracy", "image-text matching: accuracy, calibrated by an empty text", ""),
    ("region_caption_exact_match", "region captions: exact match", ""),
    ("detection_f1", "detection: F1 at IoU >= 0.5", ""),
    ("retrieval_image_to_text_R_at_1", "retrieval (CLIP stage): image -> text R@1", ""),
    ("retrieval_text_to_image_R_at_1", "retrieval (CLIP stage): text -> image R@1", ""),
]


def results_table(results: dict[str, Any]) -> str:
    """The Shapes World results as a Markdown table (rows whose figure the results lack are left out)."""
    lines = ["| figure | value | target |", "|---|---|---|"]
    lines += [f"| {name} | {results[key]:.4g} | {target} |" for key, name, target in TABLE_ROWS if key in results]
    lines += ["", f"Held-out seed {results.get('seed')}; {results.get('caption_scenes')} scenes, {results.get('videos')} videos."]
    return "\n".join(lines) + "\n"

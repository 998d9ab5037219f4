"""Score a model on held-out Shapes World: caption exact match, VQA accuracy (overall and per template),
video QA (direction, colour, shape of the mover) and few-shot binding.

Held-out means another seed than the training data: every sample is drawn from
`default_rng([seed, index, kind])`, so seed 0 (training) and the evaluation seed share no stream.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

import numpy as np

from nextmm.api import NextMM
from nextmm.data import shapes
from nextmm.data.sample import Image, Sample, Text, Video

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
    return {"caption_exact_match": round(_accuracy(preds, refs), 4), "caption_scenes": n}, examples


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


def evaluate_binding(m: NextMM, n: int, seed: int, shots: int) -> float:
    prompts, answers = [], []
    for index in range(n):
        segments, answer = shapes.binding_fewshot(np.random.default_rng([seed, index, shots]), shots)
        prompts.append(segments)
        answers.append(answer)
    preds = m.generate(prompts, max_new_tokens=4)
    return round(float(np.mean([p.split()[:1] == [a] for p, a in zip(preds, answers)])), 4)


def evaluate(m: NextMM, scenes: int = 500, videos: int = 200, binding: int = 100, seed: int = EVAL_SEED) -> dict[str, Any]:
    """All Shapes World figures, plus a few worked examples for the report (under "examples")."""
    captions, cap_examples = evaluate_captions(m, scenes, seed)
    vqa, vqa_examples = evaluate_vqa(m, scenes, seed)
    video, video_examples = evaluate_video(m, videos, seed)
    fewshot = {f"binding_{k}shot_accuracy": evaluate_binding(m, binding, seed, k) for k in (2, 4)}
    return {
        **captions, **vqa, **video, **fewshot, "seed": seed,
        "examples": {
            "captions": cap_examples[:12],
            "vqa": list(itertools.islice(vqa_examples, 0, 48, 4)),
            "video": video_examples[:6],
        },
    }

"""`nextmm eval captions | vqa | videoqa`: benchmarks a model answers in words, on their own files.

- captions: COCO captions annotations + image folder -> one caption per image -> BLEU-4, METEOR, ROUGE-L,
  CIDEr (eval/metrics.caption_scores) against all of that image's reference captions;
- vqa: VQAv2 questions + annotations + image folder -> one answer per question -> the official VQA
  accuracy, overall, per question type and per answer type (eval/metrics.vqa_scores);
- videoqa: a folder per video (frames + qa.json, `nextmm data video`'s layout), or MSRVTT-QA / MSVD-QA
  question files with extracted frames -> open-ended accuracy.
Captions and VQA can be few-shot: k solved examples from a support split (e.g. train), at random or by RICES.
Input checks and the predictions log: eval/files.py.
"""

from __future__ import annotations

from itertools import groupby, islice
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator, Sequence

import numpy as np

from nextmm.data.formats import (
    IMAGE_SUFFIXES, _image_index, _load_json, _require_dir, _require_list, _uniform, load_image, read_coco_captions, read_vqav2,
)
from nextmm.data.shards import ReadStats
from nextmm.eval.files import (
    EvalInputError, PredictionLog, batched, duplicate, loading_side, missing_files, predictions_path, read_predictions, run_batches, skips,
    unknown_ids,
)
from nextmm.eval.fewshot import SupportSet, caption_support, vqa_support
from nextmm.eval.metrics import caption_scores, normalize_answer, vqa_scores


def _predictions(
    m, known: dict, fields: tuple[str, str], source: str, predictions: str | Path | None,
    stream: Callable[[set], Iterator], predict: Callable[[list], list[dict]], out, limit: int | None, what: str,
) -> dict[Hashable, str]:
    """id -> prediction: read from a results file, or made by `predict` over the samples `stream` yields for
    the wanted ids (the first `limit` of `known`), each logged as it is made."""
    id_field, value_field = fields
    if predictions is not None:
        made = read_predictions(predictions, id_field, value_field)
        unknown_ids(made, known, id_field, source)
        return made
    wanted = list(known)[:limit] if limit else list(known)
    records = run_batches(batched(stream(set(wanted)), m.batch_size), len(wanted), predict, PredictionLog(predictions_path(out)), what)
    return {r[id_field]: r[value_field] for r in records}


# ---- captions ------------------------------------------------------------------------------------------


def coco_references(annotations_json: str | Path, image_dir: str | Path) -> tuple[dict[Hashable, list[str]], dict[Hashable, Path]]:
    """(image id -> reference captions, image id -> file) after checking the file and the folder."""
    data = _load_json(annotations_json, "COCO captions")
    images = _require_list(data, "images", annotations_json, "COCO captions")
    annotations = _require_list(data, "annotations", annotations_json, "COCO captions")
    folder = _require_dir(image_dir, "COCO image directory")
    twice = duplicate(im.get("id") for im in images if isinstance(im, dict))
    if twice is not None:
        raise EvalInputError(f"'{annotations_json}' lists image id {twice} twice in 'images'; each image needs one id")
    files = {im["id"]: folder / im["file_name"] for im in images if isinstance(im, dict) and "id" in im and isinstance(im.get("file_name"), str)}
    refs: dict[Hashable, list[str]] = {}
    for n, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or ann.get("image_id") not in files:
            raise EvalInputError(f"annotation #{n} of '{annotations_json}' has no string 'caption' or names an image_id that 'images' does not list")
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    if not refs:
        raise EvalInputError(f"'{annotations_json}' has no caption annotations to score against")
    missing_files([files[i] for i in refs], f"'{annotations_json}'", folder)
    return refs, {i: files[i] for i in refs}


def eval_captions(
    m, annotations_json: str | Path, image_dir: str | Path, out: str | Path | None = None, limit: int | None = None,
    predictions: str | Path | None = None, tokenizer: str = "auto", meteor: bool = True, max_new_tokens: int = 32,
    support: SupportSet | None = None, shots: int = 0, selection: str = "random",
) -> dict[str, Any]:
    """With `support` and shots > 0, each caption follows `shots` solved examples chosen by `selection`."""
    refs, _ = coco_references(annotations_json, image_dir)
    stats = ReadStats()

    def stream(wanted: set) -> Iterator:
        samples = (s for s in read_coco_captions(annotations_json, image_dir, stats=stats, max_side=loading_side(m))
                   if s.meta["image_id"] in wanted)
        # the reader yields each caption; one prediction per image, from its first sample
        return (next(group) for _, group in groupby(samples, key=lambda s: s.meta["image_id"]))

    def predict(batch: list) -> list[dict]:
        pictures = [s.segments[0].image for s in batch]
        if support is not None and shots:
            captions = support.caption(pictures, shots, selection, max_new_tokens=max_new_tokens)
        else:
            captions = m.caption(pictures, max_new_tokens=max_new_tokens)
        return [{"image_id": s.meta["image_id"], "caption": c} for s, c in zip(batch, captions)]

    made = _predictions(m, refs, ("image_id", "caption"), f"'{annotations_json}'", predictions, stream, predict, out, limit, "captioning")
    if not made:
        raise EvalInputError(f"no image of '{annotations_json}' could be read ({stats.summary()}); check the image folder")
    scores = caption_scores(made, {k: refs[k] for k in made}, tokenizer=tokenizer, meteor=meteor)
    return {**scores, "empty_predictions": sum(not c.strip() for c in made.values()), **skips(stats)}


def coco_support(m, annotations_json: str | Path, image_dir: str | Path, limit: int = 1000, seed: int = 0) -> SupportSet:
    """Few-shot examples from a COCO captions file (e.g. the train split): the first `limit` images, each
    with its first caption."""
    refs, files = coco_references(annotations_json, image_dir)
    ids = list(refs)[:limit]
    pictures = [load_image(files[i], loading_side(m)) for i in ids]
    return caption_support(m, pictures, [refs[i][0] for i in ids], seed)


# ---- VQA -----------------------------------------------------------------------------------------------


def vqa_questions(questions_json: str | Path, annotations_json: str | Path, image_dir: str | Path) -> dict[int, dict]:
    """question id -> {"answers", "question_type", "answer_type"} after checking the files and the folder."""
    questions = _require_list(_load_json(questions_json, "VQAv2 questions"), "questions", questions_json, "VQAv2 questions")
    annotations = _require_list(_load_json(annotations_json, "VQAv2 annotations"), "annotations", annotations_json, "VQAv2 annotations")
    folder = _require_dir(image_dir, "VQAv2 image directory")
    for what, items, path in (("question", questions, questions_json), ("annotation", annotations, annotations_json)):
        twice = duplicate(q.get("question_id") for q in items if isinstance(q, dict))
        if twice is not None:
            raise EvalInputError(f"'{path}' has two {what}s with question_id {twice}; each question needs one id")
    by_id = {a.get("question_id"): a for a in annotations if isinstance(a, dict)}
    unanswered = [q.get("question_id") for q in questions if not isinstance(q, dict) or q.get("question_id") not in by_id]
    if unanswered:
        raise EvalInputError(f"{len(unanswered)} questions of '{questions_json}' have no annotation in '{annotations_json}' (first: {unanswered[0]}); give the matching annotations file")
    index = _image_index(folder)
    missing_files([index.get(q.get("image_id"), folder / f"{q.get('image_id')}.jpg") for q in questions], f"'{questions_json}'", folder)
    table = {}
    for q in questions:
        ann = by_id[q["question_id"]]
        answers = [a["answer"] for a in ann.get("answers", []) if isinstance(a, dict) and isinstance(a.get("answer"), str)]
        if not answers:
            raise EvalInputError(f"question {q['question_id']} of '{annotations_json}' has no human answers to score against")
        table[q["question_id"]] = {"answers": answers, "question_type": ann.get("question_type", "all"), "answer_type": ann.get("answer_type", "all")}
    return table


def eval_vqa(
    m, questions_json: str | Path, annotations_json: str | Path, image_dir: str | Path, out: str | Path | None = None,
    limit: int | None = None, predictions: str | Path | None = None, answers: Sequence[str] | None = None,
    support: SupportSet | None = None, shots: int = 0, selection: str = "random",
) -> dict[str, Any]:
    """With `support` and shots > 0, each question follows `shots` solved examples chosen by `selection`."""
    table = vqa_questions(questions_json, annotations_json, image_dir)
    stats = ReadStats()

    def stream(wanted: set) -> Iterator:
        return (s for s in read_vqav2(questions_json, annotations_json, image_dir, stats=stats, max_side=loading_side(m))
                if s.meta["question_id"] in wanted)

    def predict(batch: list) -> list[dict]:
        pictures, questions = [s.segments[0].image for s in batch], [s.meta["question"] for s in batch]
        if support is not None and shots:
            said = support.ask(pictures, questions, shots, selection, answers=answers)
        else:
            said = m.ask(pictures, questions, answers=answers)
        return [{"question_id": s.meta["question_id"], "answer": a} for s, a in zip(batch, said)]

    made = _predictions(m, table, ("question_id", "answer"), f"'{questions_json}'", predictions, stream, predict, out, limit, "answering")
    if not made:
        raise EvalInputError(f"no question of '{questions_json}' could be read ({stats.summary()}); check the image folder")
    return {**vqa_scores(made, table), "empty_predictions": sum(not a.strip() for a in made.values()), **skips(stats)}


def vqa_support_files(m, questions_json: str | Path, annotations_json: str | Path, image_dir: str | Path, limit: int = 1000, seed: int = 0) -> SupportSet:
    """Few-shot examples from VQAv2 files (e.g. the train split): the first `limit` questions, each answered
    with its most common human answer."""
    vqa_questions(questions_json, annotations_json, image_dir)
    samples = list(islice(read_vqav2(questions_json, annotations_json, image_dir, max_side=loading_side(m)), limit))
    if not samples:
        raise EvalInputError(f"no support question of '{questions_json}' could be read; check its image folder")
    return vqa_support(m, [s.segments[0].image for s in samples], [s.meta["question"] for s in samples], [s.meta["answer"] for s in samples], seed)


# ---- video QA ------------------------------------------------------------------------------------------


VideoQuestion = tuple[Path, list[Path], str, str]  # (video folder, its frames, question, answer)


def _frames(video: Path) -> list[Path]:
    frames = sorted(p for p in video.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not frames:
        raise EvalInputError(f"video folder '{video}' has no frame images; extract its frames into it or drop its questions")
    return frames


def _question_list(pairs: Any, path: Path, needs_video: bool = False) -> list[dict]:
    fields = ("question", "answer")
    ok = isinstance(pairs, list) and pairs and all(
        isinstance(q, dict) and all(isinstance(q.get(f), str) for f in fields) and (not needs_video or "video_id" in q or "video" in q)
        for q in pairs
    )
    if not ok:
        video = ', "video_id": ...' if needs_video else ""
        raise EvalInputError(f"'{path}' is not a non-empty list of {{\"question\": ..., \"answer\": ...{video}}} records; fix it")
    return pairs


def video_questions(root: str | Path) -> list[VideoQuestion]:
    """From a video root in `nextmm data video`'s layout: one folder per video, its frames (sorted by name)
    and a qa.json list of {question, answer}. A folder without frames or with a bad qa.json stops the eval."""
    folder = _require_dir(root, "video root")
    found = []
    for video in sorted(p for p in folder.iterdir() if p.is_dir() and (p / "qa.json").is_file()):
        frames = _frames(video)
        found += [(video, frames, q["question"], q["answer"]) for q in _question_list(_load_json(video / "qa.json", "video QA"), video / "qa.json")]
    if not found:
        raise EvalInputError(f"'{root}' has no video folder with a qa.json; give one folder per video with its frames and questions")
    return found


def video_questions_json(qa_json: str | Path, frames_dir: str | Path) -> list[VideoQuestion]:
    """From MSRVTT-QA / MSVD-QA's own question files: a JSON list of {"video_id" (or "video"), "question",
    "answer"}, with each video's frames extracted into FRAMES/<video_id>/ or FRAMES/video<video_id>/."""
    folder = _require_dir(frames_dir, "frames folder")
    records = _question_list(_load_json(qa_json, "video QA"), Path(qa_json), needs_video=True)
    found, frames_of = [], {}
    for q in records:
        name = str(q.get("video_id", q.get("video")))
        video = next((c for c in (folder / name, folder / f"video{name}") if c.is_dir()), None)
        if video is None:
            raise EvalInputError(f"no frames folder for video '{name}' of '{qa_json}' in '{frames_dir}' (looked for {name}/ and video{name}/); extract its frames there")
        if video not in frames_of:
            frames_of[video] = _frames(video)
        found.append((video, frames_of[video], q["question"], q["answer"]))
    return found


def eval_video_qa(
    m, questions: list[VideoQuestion], out: str | Path | None = None, limit: int | None = None, answers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Open-ended video QA accuracy (from `video_questions` or `video_questions_json`): the answer right after
    VQA normalization (eval/metrics.normalize_answer)."""
    items = questions[:limit]
    # evenly spaced frames: as many as the model reads, or 8 (Shapes World's clips) when it reads all
    frames_wanted = m.config.vision.video_frames or 8

    def predict(batch: list) -> list[dict]:
        videos = [[load_image(f, loading_side(m)) for f in [frames[i] for i in _uniform(len(frames), frames_wanted)]] for _, frames, _, _ in batch]
        said = m.ask(videos, [q for _, _, q, _ in batch], answers=answers)
        return [{"video": v.name, "question": q, "answer": a} for (v, _, q, _), a in zip(batch, said)]

    made = run_batches(batched(iter(items), m.batch_size), len(items), predict, PredictionLog(predictions_path(out)), "answering")
    right = [normalize_answer(r["answer"]) == normalize_answer(truth) for r, (_, _, _, truth) in zip(made, items)]
    return {"accuracy": float(np.mean(right)), "questions": len(items), "videos": len({v for v, _, _, _ in items})}

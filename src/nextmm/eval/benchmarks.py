"""`nextmm eval captions | vqa | retrieval | classify`: a model scored on a benchmark's own files.

- captions: COCO captions annotations + image folder -> one caption per image -> BLEU-4, METEOR, ROUGE-L,
  CIDEr (eval/metrics.caption_scores) against all of that image's reference captions;
- vqa: VQAv2 questions + annotations + image folder -> one answer per question -> the official VQA
  accuracy, overall, per question type and per answer type (eval/metrics.vqa_scores);
- retrieval: COCO captions -> Recall@1/5/10 image-to-text and text-to-image with the CLIP stage;
- classify: an ImageNet-style folder -> zero-shot accuracy, by CLIP or by the LLM's constrained caption.

The input files are checked before any model work: duplicate ids, annotations that name unknown images
or questions, and missing image files stop the eval with one sentence. An image that exists but cannot
be decoded is skipped and counted in the result. With an output path, every prediction is appended to
OUT.predictions.jsonl as soon as it is made, so an eval stopped half-way keeps what it did; the same
file, or a COCO / VQA results JSON, can be scored again with `predictions=` and no model.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import groupby, islice
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from nextmm.api import class_prompts
from nextmm.data.formats import (
    IMAGE_SUFFIXES, _image_index, _load_json, _require_dir, _require_list, load_image, read_coco_captions, read_vqav2,
)
from nextmm.data.shards import DataError, ReadStats
from nextmm.errors import UserError
from nextmm.eval.metrics import caption_scores, owners_to_relevant, retrieval_recall, vqa_scores


class EvalInputError(UserError):
    pass


def _duplicate(ids: Iterable[Hashable]) -> Hashable | None:
    counts = Counter(ids)
    return next((i for i, n in counts.items() if n > 1), None)


def _missing_files(paths: Sequence[Path], listed_in: str, image_dir: Path) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise EvalInputError(
            f"{len(missing)} of the {len(paths)} images {listed_in} names are missing from '{image_dir}' "
            f"(first: '{missing[0].name}'); give the image folder that matches the annotations"
        )


class PredictionLog:
    """Predictions appended one JSON line each as they are made (nothing when there is no path)."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def add(self, records: list[dict]) -> None:
        if self.path is not None and records:
            with self.path.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)


def predictions_path(out: str | Path | None) -> Path | None:
    return None if out is None else Path(f"{out}.predictions.jsonl")


def read_predictions(path: str | Path, id_field: str, value_field: str) -> dict[Hashable, str]:
    """A results file: a JSON list (COCO / VQA results format) or JSON lines, each with `id_field` and
    `value_field`."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"predictions file '{path}' does not exist; check the path")
    text = path.read_text(encoding="utf-8").strip()
    try:
        records = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise EvalInputError(f"predictions file '{path}' is neither a JSON list nor JSON lines ({err}); give a results file") from err
    if not records:
        raise EvalInputError(f"predictions file '{path}' holds no predictions; run the eval with the model instead")
    bad = next((r for r in records if not isinstance(r, dict) or id_field not in r or not isinstance(r.get(value_field), str)), None)
    if bad is not None:
        raise EvalInputError(f"predictions file '{path}' has a record without '{id_field}' and a string '{value_field}': {str(bad)[:80]}")
    twice = _duplicate(r[id_field] for r in records)
    if twice is not None:
        raise EvalInputError(f"predictions file '{path}' has two predictions for {id_field} {twice}; keep one per {id_field}")
    return {r[id_field]: r[value_field] for r in records}


def _unknown_ids(predictions: dict, known: dict, what: str, source: str) -> None:
    unknown = [k for k in predictions if k not in known]
    if unknown:
        raise EvalInputError(f"{len(unknown)} predictions name {what} that {source} does not have (first: {unknown[0]}); score them against the matching annotations")


def _batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while batch := list(islice(items, size)):
        yield batch


def _run(groups: Iterator[list], total: int, predict: Callable[[list], list[dict]], log: PredictionLog, what: str) -> list[dict]:
    made: list[dict] = []
    with tqdm(total=total, desc=what, unit="item") as bar:
        for group in groups:
            records = predict(group)
            log.add(records)
            made += records
            bar.update(len(group))
    return made


# ---- captions ------------------------------------------------------------------------------------------


def coco_references(annotations_json: str | Path, image_dir: str | Path) -> tuple[dict[Hashable, list[str]], dict[Hashable, Path]]:
    """(image id -> reference captions, image id -> file) after checking the file and the folder."""
    data = _load_json(annotations_json, "COCO captions")
    images = _require_list(data, "images", annotations_json, "COCO captions")
    annotations = _require_list(data, "annotations", annotations_json, "COCO captions")
    folder = _require_dir(image_dir, "COCO image directory")
    twice = _duplicate(im.get("id") for im in images if isinstance(im, dict))
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
    _missing_files([files[i] for i in refs], f"'{annotations_json}'", folder)
    return refs, {i: files[i] for i in refs}


def eval_captions(
    m, annotations_json: str | Path, image_dir: str | Path, out: str | Path | None = None, limit: int | None = None,
    predictions: str | Path | None = None, tokenizer: str = "auto", meteor: bool = True, max_new_tokens: int = 32,
) -> dict[str, Any]:
    refs, _ = coco_references(annotations_json, image_dir)
    stats = ReadStats()
    if predictions is not None:
        made = read_predictions(predictions, "image_id", "caption")
        _unknown_ids(made, refs, "images", f"'{annotations_json}'")
    else:
        wanted = list(refs)[:limit] if limit else list(refs)
        keep = set(wanted)
        samples = (s for s in read_coco_captions(annotations_json, image_dir, stats=stats, max_side=4 * m.config.vision.image_size)
                   if s.meta["image_id"] in keep)
        # the reader yields each caption; one prediction per image, from its first sample
        firsts = (next(group) for _, group in groupby(samples, key=lambda s: s.meta["image_id"]))

        def predict(batch: list) -> list[dict]:
            captions = m.caption([s.segments[0].image for s in batch], max_new_tokens=max_new_tokens)
            return [{"image_id": s.meta["image_id"], "caption": c} for s, c in zip(batch, captions)]

        records = _run(_batched(firsts, m.batch_size), len(wanted), predict, PredictionLog(predictions_path(out)), "captioning")
        made = {r["image_id"]: r["caption"] for r in records}
    if not made:
        raise EvalInputError(f"no image of '{annotations_json}' could be read ({stats.summary()}); check the image folder")
    scores = caption_scores(made, {k: refs[k] for k in made}, tokenizer=tokenizer, meteor=meteor)
    return {**scores, "empty_predictions": sum(not c.strip() for c in made.values()), **_skips(stats)}


def _skips(stats: ReadStats) -> dict[str, Any]:
    return {"skipped": stats.skipped, "skip_reasons": stats.errors[:5]} if stats.skipped else {"skipped": 0}


# ---- VQA -----------------------------------------------------------------------------------------------


def vqa_questions(questions_json: str | Path, annotations_json: str | Path, image_dir: str | Path) -> dict[int, dict]:
    """question id -> {"answers", "question_type", "answer_type"} after checking the files and the folder."""
    questions = _require_list(_load_json(questions_json, "VQAv2 questions"), "questions", questions_json, "VQAv2 questions")
    annotations = _require_list(_load_json(annotations_json, "VQAv2 annotations"), "annotations", annotations_json, "VQAv2 annotations")
    folder = _require_dir(image_dir, "VQAv2 image directory")
    for what, items, path in (("question", questions, questions_json), ("annotation", annotations, annotations_json)):
        twice = _duplicate(q.get("question_id") for q in items if isinstance(q, dict))
        if twice is not None:
            raise EvalInputError(f"'{path}' has two {what}s with question_id {twice}; each question needs one id")
    by_id = {a.get("question_id"): a for a in annotations if isinstance(a, dict)}
    unanswered = [q.get("question_id") for q in questions if not isinstance(q, dict) or q.get("question_id") not in by_id]
    if unanswered:
        raise EvalInputError(f"{len(unanswered)} questions of '{questions_json}' have no annotation in '{annotations_json}' (first: {unanswered[0]}); give the matching annotations file")
    index = _image_index(folder)
    _missing_files([index.get(q.get("image_id"), folder / f"{q.get('image_id')}.jpg") for q in questions], f"'{questions_json}'", folder)
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
) -> dict[str, Any]:
    table = vqa_questions(questions_json, annotations_json, image_dir)
    stats = ReadStats()
    if predictions is not None:
        made = read_predictions(predictions, "question_id", "answer")
        _unknown_ids(made, table, "questions", f"'{questions_json}'")
    else:
        wanted = list(table)[:limit] if limit else list(table)
        keep = set(wanted)
        samples = (s for s in read_vqav2(questions_json, annotations_json, image_dir, stats=stats, max_side=4 * m.config.vision.image_size)
                   if s.meta["question_id"] in keep)

        def predict(batch: list) -> list[dict]:
            said = m.ask([s.segments[0].image for s in batch], [s.meta["question"] for s in batch], answers=answers)
            return [{"question_id": s.meta["question_id"], "answer": a} for s, a in zip(batch, said)]

        records = _run(_batched(samples, m.batch_size), len(wanted), predict, PredictionLog(predictions_path(out)), "answering")
        made = {r["question_id"]: r["answer"] for r in records}
    if not made:
        raise EvalInputError(f"no question of '{questions_json}' could be read ({stats.summary()}); check the image folder")
    return {**vqa_scores(made, table), "empty_predictions": sum(not a.strip() for a in made.values()), **_skips(stats)}


# ---- retrieval and zero-shot classification (the CLIP stage) ------------------------------------------


def _load_all(m, files: Sequence[Path], stats: ReadStats, what: str) -> list:
    """The images that decode, as (index, picture); the others are skipped and counted."""
    loaded = []
    for i, path in enumerate(tqdm(files, desc=what, unit="image")):
        try:
            loaded.append((i, load_image(path, 4 * m.config.vision.image_size)))
        except DataError as err:
            stats.skip(str(err))
    return loaded


def eval_retrieval(m, annotations_json: str | Path, image_dir: str | Path, limit: int | None = None) -> dict[str, Any]:
    """Image-text retrieval on a COCO captions file: Recall@1/5/10 both ways over all its images and all
    their captions, ranked by the CLIP stage's similarity."""
    m.require_clip()
    refs, files = coco_references(annotations_json, image_dir)
    ids = list(refs)[:limit] if limit else list(refs)
    stats = ReadStats()
    loaded = _load_all(m, [files[i] for i in ids], stats, "reading images")
    if not loaded:
        raise EvalInputError(f"no image of '{annotations_json}' could be read ({stats.summary()}); check the image folder")
    texts, owner = [], []
    for row, (i, _) in enumerate(loaded):
        texts += refs[ids[i]]
        owner += [row] * len(refs[ids[i]])
    similarity = m.clip_image_features([img for _, img in loaded]) @ m.clip_text_features(texts).T
    return {**retrieval_recall(similarity, owners_to_relevant(owner, len(loaded))), "images": len(loaded), "texts": len(texts), **_skips(stats)}


def class_folders(root: str | Path) -> dict[str, list[Path]]:
    """An ImageNet-style folder: one sub-folder of images per class, named after it."""
    folder = _require_dir(root, "classification image folder")
    classes = {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) for d in sorted(folder.iterdir()) if d.is_dir()}
    classes = {name: files for name, files in classes.items() if files}
    if len(classes) < 2:
        raise EvalInputError(f"'{root}' needs at least two sub-folders of images, one per class; it has {len(classes)}")
    return classes


def eval_classification(m, root: str | Path, template: str = "{}", method: str = "clip", limit: int | None = None) -> dict[str, Any]:
    """Zero-shot classification of an ImageNet-style folder (class names: the sub-folders', "_" read as a
    space). method "clip": the most similar class prompt (`template`) by the CLIP stage; "caption": the
    LLM captions each image, constrained to the class prompts (trie decoding)."""
    if method not in ("clip", "caption"):
        raise EvalInputError(f"method '{method}' is unknown; use clip or caption")
    if method == "clip":
        m.require_clip()
    classes = class_folders(root)
    labels = {name: name.replace("_", " ") for name in classes}
    items = [(name, path) for name, files in classes.items() for path in files[:limit]]
    stats = ReadStats()
    loaded = _load_all(m, [p for _, p in items], stats, "reading images")
    if not loaded:
        raise EvalInputError(f"no image under '{root}' could be read ({stats.summary()}); check the folder")
    pictures, truth = [img for _, img in loaded], [labels[items[i][0]] for i, _ in loaded]
    names = list(labels.values())
    prompts = class_prompts(names, template)
    if method == "clip":
        predicted = m.classify(pictures, names, template)
    else:
        said = m.caption(pictures, answers=prompts)
        predicted = [names[prompts.index(s)] if s in prompts else s for s in said]
    per_class = {n: float(np.mean([p == t for p, t in zip(predicted, truth) if t == n])) for n in names if n in truth}
    return {"accuracy": float(np.mean([p == t for p, t in zip(predicted, truth)])), "per_class": per_class,
            "images": len(loaded), "classes": len(names), "method": method, **_skips(stats)}

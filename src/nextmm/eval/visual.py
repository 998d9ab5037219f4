"""`nextmm eval grounding | images | retrieval | classify`: benchmarks of where and what a model sees or draws.

- grounding: RefCOCO-style expressions with boxes -> accuracy at IoU >= 0.5 of the boxes the model writes;
- images: prompts + reference images -> FID (on CLIP or user features), CLIP score, the Shapes World judge;
- retrieval: COCO captions -> Recall@1/5/10 image-to-text and text-to-image with the CLIP stage;
- classify: an ImageNet-style folder -> zero-shot accuracy, by CLIP or by the LLM's constrained caption.
Input checks and the predictions log: eval/files.py.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image as PILImage
from tqdm import tqdm

from nextmm.api import class_prompts
from nextmm.data.formats import IMAGE_SUFFIXES, _load_json, _require_dir, load_image
from nextmm.data.shards import ReadStats
from nextmm.eval.files import (
    EvalInputError, PredictionLog, batched, duplicate, load_all, missing_files, predictions_path, run_batches, skips,
)
from nextmm.eval.language import coco_references
from nextmm.eval.metrics import box_iou, clip_score, frechet_distance, grounding_accuracy, owners_to_relevant, retrieval_recall
from nextmm.worlds.shapes.judge import objects_in_caption, score_prompt


# ---- grounding -----------------------------------------------------------------------------------------


def grounding_records(refs_json: str | Path, image_dir: str | Path) -> list[dict]:
    """A RefCOCO-style expressions file: a JSON list (or {"refs": [...]}) of {"image": file name, "expression":
    text, "box": [x0, y0, x1, y1]} or COCO's "bbox": [x, y, w, h], in pixels; optional unique "id". Every box
    is checked against its image's size before any model work."""
    data = _load_json(refs_json, "grounding expressions")
    records = data.get("refs") if isinstance(data, dict) else data
    if not isinstance(records, list) or not records:
        raise EvalInputError(f"'{refs_json}' holds no expressions: give a JSON list of {{image, expression, box}} records")
    folder = _require_dir(image_dir, "grounding image directory")
    twice = duplicate(r.get("id") for r in records if isinstance(r, dict) and "id" in r)
    if twice is not None:
        raise EvalInputError(f"'{refs_json}' has two expressions with id {twice}; each needs its own id")
    out = []
    for n, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("image"), str) or not isinstance(r.get("expression"), str):
            raise EvalInputError(f"expression #{n} of '{refs_json}' lacks a string 'image' or 'expression'")
        raw = r.get("box") if "box" in r else r.get("bbox")
        if not (isinstance(raw, list) and len(raw) == 4 and all(isinstance(v, (int, float)) for v in raw)):
            raise EvalInputError(f"expression #{n} of '{refs_json}' has no 'box' [x0, y0, x1, y1] or 'bbox' [x, y, w, h] of four numbers")
        box = list(raw) if "box" in r else [raw[0], raw[1], raw[0] + raw[2], raw[1] + raw[3]]
        out.append({"id": r.get("id", n), "path": folder / r["image"], "expression": r["expression"], "box": box})
    missing_files(list(dict.fromkeys(rec["path"] for rec in out)), f"'{refs_json}'", folder)
    sizes: dict[Path, tuple[int, int]] = {}
    for n, rec in enumerate(out):
        if rec["path"] not in sizes:
            try:
                with PILImage.open(rec["path"]) as im:
                    sizes[rec["path"]] = im.size
            except Exception as err:  # PIL raises many types for bad files
                raise EvalInputError(f"image '{rec['path']}' of expression #{n} cannot be read ({type(err).__name__}); replace it") from err
        w, h = sizes[rec["path"]]
        x0, y0, x1, y1 = rec["box"]
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise EvalInputError(
                f"expression #{n} of '{refs_json}' has box {rec['box']} outside its {w}x{h} image '{rec['path'].name}' "
                "(or empty); boxes are pixels x0 y0 x1 y1, or bbox x y w h"
            )
    return out


def eval_grounding(m, expressions: list[dict], out: str | Path | None = None, limit: int | None = None) -> dict[str, Any]:
    """Acc@0.5 of the boxes the model writes (location tokens) for each referring expression (from
    `grounding_records`). Images are read at full size: the boxes are in their pixels."""
    records = expressions[:limit]

    def predict(batch: list[dict]) -> list[dict]:
        boxes = m.ground([load_image(r["path"]) for r in batch], [r["expression"] for r in batch])
        return [{"id": r["id"], "box": list(b) if b is not None else None} for r, b in zip(batch, boxes)]

    made = run_batches(batched(iter(records), m.batch_size), len(records), predict, PredictionLog(predictions_path(out)), "grounding")
    predicted = [r["box"] for r in made]
    ious = [box_iou(p, r["box"]) if p is not None else 0.0 for p, r in zip(predicted, records)]
    return {
        "acc_at_0.5": grounding_accuracy(predicted, [r["box"] for r in records]),
        "mean_iou": float(np.mean(ious)), "no_box": sum(p is None for p in predicted), "expressions": len(records),
    }


# ---- retrieval and zero-shot classification (the CLIP stage) ------------------------------------------


def eval_retrieval(m, annotations_json: str | Path, image_dir: str | Path, limit: int | None = None) -> dict[str, Any]:
    """Image-text retrieval on a COCO captions file: Recall@1/5/10 both ways over all its images and all
    their captions, ranked by the CLIP stage's similarity."""
    m.require_clip()
    refs, files = coco_references(annotations_json, image_dir)
    ids = list(refs)[:limit] if limit else list(refs)
    stats = ReadStats()
    loaded = load_all(m, [files[i] for i in ids], stats, "reading images")
    if not loaded:
        raise EvalInputError(f"no image of '{annotations_json}' could be read ({stats.summary()}); check the image folder")
    texts, owner = [], []
    for row, (i, _) in enumerate(loaded):
        texts += refs[ids[i]]
        owner += [row] * len(refs[ids[i]])
    similarity = m.clip_image_features([img for _, img in loaded]) @ m.clip_text_features(texts).T
    return {**retrieval_recall(similarity, owners_to_relevant(owner, len(loaded))), "images": len(loaded), "texts": len(texts), **skips(stats)}


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
    loaded = load_all(m, [p for _, p in items], stats, "reading images")
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
            "images": len(loaded), "classes": len(names), "method": method, **skips(stats)}


# ---- generated images ----------------------------------------------------------------------------------


def feature_extractor(m, spec: str) -> Callable[[list], np.ndarray]:
    """"clip": the model's CLIP image tower; "package.module:function": any callable that maps a list of
    PIL images to an (n, d) array (e.g. an Inception network the user has locally)."""
    if spec == "clip":
        m.require_clip()
        return lambda images: m.clip_image_features(images).numpy()
    module_name, _, attr = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise EvalInputError(f"feature extractor '{spec}' cannot be imported ({err}); give clip or package.module:function") from None
    return lambda images: np.asarray(function(images), dtype=np.float64)


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"prompts file '{path}' does not exist; write one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise EvalInputError(f"prompts file '{path}' has no prompts; write one prompt per line")
    return prompts


def eval_images(
    m, prompts_file: str | Path, reference_dir: str | Path, out_dir: str | Path | None = None, features: str = "clip",
    guidance: float | None = None, steps: int | None = None, seed: int = 0, candidates: int = 1,
) -> dict[str, Any]:
    """Text-to-image quality: one image drawn per prompt (the best of `candidates` by the model's own
    judgement, as `draw` chooses), then the Frechet distance (FID's, on `features`)
    between them and the reference images, the CLIP score of each drawing against its prompt (when the
    model has a CLIP stage) and, for Shapes World prompts, the pixel judge's share of drawings with every
    named object right. With out_dir, each drawing is saved there as it is made."""
    prompts = read_prompts(prompts_file)
    folder = _require_dir(reference_dir, "reference image folder")
    references = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(references) < 2:
        raise EvalInputError(f"reference folder '{reference_dir}' needs at least two images for the Frechet distance; it has {len(references)}")
    extract = feature_extractor(m, features)
    saved = Path(out_dir) if out_dir is not None else None
    if saved is not None:
        saved.mkdir(parents=True, exist_ok=True)
    drawn: list = []
    for batch in tqdm(list(batched(iter(prompts), m.batch_size)), desc="drawing", unit="batch"):
        images = m.draw(batch, guidance=guidance, steps=steps, seed=seed + len(drawn), candidates=candidates)
        if saved is not None:
            for k, image in enumerate(images):
                image.save(saved / f"{len(drawn) + k:05d}.png")
        drawn += images
    stats = ReadStats()
    real = [img for _, img in load_all(m, references, stats, "reading references")]
    results: dict[str, Any] = {"fid": frechet_distance(extract(drawn), extract(real)), "features": features, "images": len(drawn),
                               "references": len(real), "candidates": candidates}
    if m.clip is not None:
        results["clip_score"] = clip_score(m.clip_image_features(drawn), m.clip_text_features(prompts))
    wanted = [objects_in_caption(p) for p in prompts]
    if all(wanted):
        results["judge_all_objects_right"] = float(np.mean([score_prompt(img, w)["all_objects_right"] for img, w in zip(drawn, wanted)]))
    return {**results, **skips(stats)}

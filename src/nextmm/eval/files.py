"""The machinery every `nextmm eval` benchmark shares: input checks that stop with one sentence, the
predictions log that keeps an interrupted eval's work, results files, batching with a progress bar.

Checks run before any model work: duplicate ids, records that name unknown images or questions, missing
image files. An image that exists but cannot be decoded is skipped and counted (`skips`). With an output
path, every prediction is appended to OUT.predictions.jsonl as soon as it is made; that file, or a COCO /
VQA results JSON, can be scored again without a model (`read_predictions`).
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

from tqdm import tqdm

from nextmm.data.formats import load_image
from nextmm.data.shards import DataError, ReadStats
from nextmm.errors import UserError


class EvalInputError(UserError):
    pass


def duplicate(ids: Iterable[Hashable]) -> Hashable | None:
    counts = Counter(ids)
    return next((i for i, n in counts.items() if n > 1), None)


def missing_files(paths: Sequence[Path], listed_in: str, image_dir: Path) -> None:
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
    twice = duplicate(r[id_field] for r in records)
    if twice is not None:
        raise EvalInputError(f"predictions file '{path}' has two predictions for {id_field} {twice}; keep one per {id_field}")
    return {r[id_field]: r[value_field] for r in records}


def unknown_ids(predictions: dict, known: dict, what: str, source: str) -> None:
    unknown = [k for k in predictions if k not in known]
    if unknown:
        raise EvalInputError(f"{len(unknown)} predictions name a {what} that {source} does not have (first: {unknown[0]}); score them against the matching annotations")


def batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while batch := list(islice(items, size)):
        yield batch


def run_batches(groups: Iterator[list], total: int, predict: Callable[[list], list[dict]], log: PredictionLog, what: str) -> list[dict]:
    made: list[dict] = []
    with tqdm(total=total, desc=what, unit="item") as bar:
        for group in groups:
            records = predict(group)
            log.add(records)
            made += records
            bar.update(len(group))
    return made

def skips(stats: ReadStats) -> dict[str, Any]:
    return {"skipped": stats.skipped, "skip_reasons": stats.errors[:5]} if stats.skipped else {"skipped": 0}



def loading_side(m) -> int:
    """The longer side benchmark images are shrunk to as they are read: a few times what the model sees,
    so its own resize keeps the detail while a large split stays small in memory."""
    return 4 * m.config.vision.image_size


def load_all(m, files: Sequence[Path], stats: ReadStats, what: str) -> list:
    """The images that decode, as (index, picture); the others are skipped and counted."""
    loaded = []
    for i, path in enumerate(tqdm(files, desc=what, unit="image")):
        try:
            loaded.append((i, load_image(path, loading_side(m))))
        except DataError as err:
            stats.skip(str(err))
    return loaded



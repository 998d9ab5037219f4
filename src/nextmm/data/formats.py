"""Users' data in standard formats (COCO captions, VQAv2, MMC4, frame folders, LLaVA conversations) -> `Sample`s -> shards.

Every reader checks the file's overall schema when called and raises `DataError` with one sentence if
the file is not what it should be; individual bad records (a missing image, a corrupt image, a record
lacking a field) are skipped and counted in the `ReadStats` passed as `stats`, never raised.
Readers load each picture once even when several samples share it (COCO has ~5 captions per image).
"""

from __future__ import annotations

import inspect
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image as PILImage
from tqdm import tqdm

from nextmm.data.sample import (
    Image, Sample, Segment, Text, Video, caption_sample, conversation_sample, video_caption_sample, video_qa_sample, vqa_sample,
)
from nextmm.data.shards import DataError, PathLike, ReadStats, ShardWriter

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def load_image(path: PathLike, max_side: int | None = None) -> PILImage.Image:
    """Open an image as RGB, shrunk so its longer side is at most `max_side` (None: unchanged)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file '{path}' does not exist; check the path or the image directory")
    try:
        with PILImage.open(path) as im:
            image = im.convert("RGB")
    except Exception as err:  # PIL raises many types for bad files (OSError, SyntaxError, ValueError...)
        raise DataError(f"image file '{path}' could not be decoded ({type(err).__name__}: {err}); replace or remove it") from err
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, PILImage.Resampling.BICUBIC)
    return image


def _load_json(path: PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file '{path}' does not exist; check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{what} file '{path}' is not valid JSON ({err}); give the original {what} file") from err


def _require_list(data: Any, field: str, path: PathLike, what: str) -> list[Any]:
    if not isinstance(data, dict) or not isinstance(data.get(field), list):
        found = "a JSON " + type(data).__name__ if not isinstance(data, dict) else f"an object with keys {sorted(data)[:6]}"
        raise DataError(f"'{path}' is not a {what} file: it is {found}, without a '{field}' list; give the {what} JSON")
    return data[field]


def _require_dir(path: PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{what} '{path}' is not a directory; check the path")
    return path


def _grouped(items: list[Any], key: Callable[[Any], Any]) -> dict[Any, list[Any]]:
    """Group by key, keeping first-appearance order, so each image is loaded once for all its records."""
    groups: dict[Any, list[Any]] = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    return groups


# ------------------------------------------------------------------------------------------------ COCO

def read_coco_captions(
    annotations_json: PathLike, image_dir: PathLike, *, stats: ReadStats | None = None, max_side: int | None = None
) -> Iterator[Sample]:
    """One `caption_sample` per COCO caption annotation (caption whitespace-stripped, casing kept)."""
    data = _load_json(annotations_json, "COCO captions")
    images = _require_list(data, "images", annotations_json, "COCO captions")
    annotations = _require_list(data, "annotations", annotations_json, "COCO captions")
    image_dir = _require_dir(image_dir, "COCO image directory")
    files = {im["id"]: im["file_name"] for im in images if isinstance(im, dict) and isinstance(im.get("id"), (int, str)) and isinstance(im.get("file_name"), str)}
    return _coco(annotations, files, image_dir, stats if stats is not None else ReadStats(), max_side)


def _coco(annotations, files, image_dir: Path, stats: ReadStats, max_side) -> Iterator[Sample]:
    good = []
    for n, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or not isinstance(ann.get("image_id"), (int, str)):
            stats.skip(f"COCO annotation #{n} lacks an 'image_id' or a string 'caption'")
        elif ann["image_id"] not in files:
            stats.skip(f"COCO annotation #{n} refers to image_id {ann['image_id']}, which is not in 'images'")
        else:
            good.append((n, ann))
    for image_id, anns in _grouped(good, lambda item: item[1]["image_id"]).items():
        try:
            image = load_image(image_dir / files[image_id], max_side)
        except DataError as err:
            stats.skip(f"{len(anns)} caption(s) skipped: {err}", count=len(anns))
            continue
        for n, ann in anns:
            key = f"coco_{image_id}_{ann.get('id', n)}"
            stats.samples += 1
            yield caption_sample(key, image, ann["caption"].strip(), image_id=image_id, file_name=files[image_id])


# ----------------------------------------------------------------------------------------------- VQAv2

def _image_index(image_dir: Path) -> dict[int, Path]:
    """Numeric id -> file for `COCO_train2014_000000000009.jpg` style names and plain `9.jpg` alike."""
    index: dict[int, Path] = {}
    for path in sorted(image_dir.iterdir()):
        match = re.search(r"(\d+)$", path.stem)
        if match and path.suffix.lower() in IMAGE_SUFFIXES:
            index.setdefault(int(match.group(1)), path)
    return index


def read_vqav2(
    questions_json: PathLike,
    annotations_json: PathLike | None,
    image_dir: PathLike,
    image_pattern: str | None = None,
    *,
    stats: ReadStats | None = None,
    max_side: int | None = None,
) -> Iterator[Sample]:
    """One `vqa_sample` per VQAv2 question, answered with its `multiple_choice_answer`.

    `image_pattern` (e.g. "COCO_val2014_{image_id:012d}.jpg") names each image file; without it the
    folder is indexed once by the number that ends each file name. meta keeps the 10 human answers.
    """
    if annotations_json is None:
        raise DataError("VQAv2 needs the annotations file (the answers) next to the questions file; the test split has none and cannot be used for training")
    questions = _require_list(_load_json(questions_json, "VQAv2 questions"), "questions", questions_json, "VQAv2 questions")
    annotations = _require_list(_load_json(annotations_json, "VQAv2 annotations"), "annotations", annotations_json, "VQAv2 annotations")
    image_dir = _require_dir(image_dir, "VQAv2 image directory")
    if image_pattern is not None:
        def locate(image_id: int) -> Path:
            return image_dir / image_pattern.format(image_id=image_id)
    else:
        index = _image_index(image_dir)

        def locate(image_id: int) -> Path:
            return index.get(image_id, image_dir / f"{image_id}.jpg")  # the missing path names itself in the error
    answers = {a["question_id"]: a for a in annotations if isinstance(a, dict) and isinstance(a.get("question_id"), int)}
    return _vqa(questions, answers, locate, stats if stats is not None else ReadStats(), max_side)


def _vqa(questions, answers, locate, stats: ReadStats, max_side) -> Iterator[Sample]:
    good = []
    for n, q in enumerate(questions):
        if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not all(isinstance(q.get(f), int) for f in ("image_id", "question_id")):
            stats.skip(f"VQAv2 question #{n} lacks a string 'question' or an integer 'image_id' / 'question_id'")
            continue
        ann = answers.get(q.get("question_id"))
        if ann is None or not isinstance(ann.get("multiple_choice_answer"), str):
            stats.skip(f"VQAv2 question {q.get('question_id')} has no annotation with a 'multiple_choice_answer'")
            continue
        good.append((q, ann))
    for image_id, items in _grouped(good, lambda item: item[0]["image_id"]).items():
        try:
            image = load_image(locate(image_id), max_side)
        except DataError as err:
            stats.skip(f"{len(items)} question(s) skipped: {err}", count=len(items))
            continue
        for q, ann in items:
            all_answers = [a["answer"] for a in ann.get("answers", []) if isinstance(a, dict) and "answer" in a]
            stats.samples += 1
            yield vqa_sample(
                f"vqa_{q['question_id']}", image, q["question"], ann["multiple_choice_answer"],
                question_id=q["question_id"], image_id=image_id, answers=all_answers,
                question_type=ann.get("question_type"), answer_type=ann.get("answer_type"),
            )


# ------------------------------------------------------------------------------------------------ MMC4

def read_mmc4(
    jsonl_path: PathLike, image_dir: PathLike, *, stats: ReadStats | None = None, max_side: int | None = None
) -> Iterator[Sample]:
    """One interleaved Sample per MMC4 document (a line of JSON).

    MMC4 convention: each image goes right BEFORE the sentence it is matched to (`matched_text_index`);
    several images matched to one sentence keep their `image_info` order. A missing or corrupt image is
    dropped from its document (the text stays) and counted; an unparseable line is skipped and counted.
    """
    path = Path(jsonl_path)
    if not path.is_file():
        raise DataError(f"MMC4 file '{path}' does not exist; check the path")
    image_dir = _require_dir(image_dir, "MMC4 image directory")
    with path.open(encoding="utf-8") as f:  # the first document decides whether this is MMC4 at all
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    break  # one bad line is a bad record, not a wrong file
                if not isinstance(first, dict) or not isinstance(first.get("text_list"), list):
                    raise DataError(f"'{path}' is not an MMC4 JSON-lines file: its first line has no 'text_list' list; give one document per line")
                break
    return _mmc4(path, image_dir, stats if stats is not None else ReadStats(), max_side)


def _mmc4(path: Path, image_dir: Path, stats: ReadStats, max_side) -> Iterator[Sample]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as err:
                stats.skip(f"{path.name}:{line_no} is not valid JSON ({err})")
                continue
            texts = doc.get("text_list") if isinstance(doc, dict) else None
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                stats.skip(f"{path.name}:{line_no} has no 'text_list' list of strings")
                continue
            before: dict[int, list[Image]] = defaultdict(list)
            names = []
            for info in doc.get("image_info") or []:
                name, at = (info.get("image_name"), info.get("matched_text_index")) if isinstance(info, dict) else (None, None)
                if not isinstance(name, str) or not isinstance(at, int) or not 0 <= at < len(texts):
                    stats.skip(f"{path.name}:{line_no}: image entry {info!r} needs an 'image_name' and a 'matched_text_index' within text_list")
                    continue
                try:
                    before[at].append(Image(load_image(image_dir / name, max_side)))
                    names.append(name)
                except DataError as err:
                    stats.skip(f"{path.name}:{line_no}: image dropped: {err}")
            segments: list[Any] = []
            for i, text in enumerate(texts):
                segments.extend(before[i])
                segments.append(Text(text))
            if not segments:
                stats.skip(f"{path.name}:{line_no} is an empty document")
                continue
            meta = {"source": path.name, "line": line_no, "images": names}
            if "url" in doc:
                meta["url"] = doc["url"]
            stats.samples += 1
            yield Sample(f"mmc4_{path.stem}_{line_no}", "interleaved", segments, meta)


# --------------------------------------------------------------------------------------- frame folders

def _uniform(n: int, m: int | None) -> list[int]:
    """m indices spread evenly over range(n), each at the centre of its stretch (all when m is None or >= n)."""
    if m is None or m >= n:
        return list(range(n))
    return [(2 * i + 1) * n // (2 * m) for i in range(m)]


def read_video_folders(
    root: PathLike, *, max_frames: int | None = None, stats: ReadStats | None = None, max_side: int | None = None
) -> Iterator[Sample]:
    """Each subfolder of `root` is a video: frame images (sorted by name), `caption.txt`, optional `qa.json`.

    Yields a `video_caption_sample` per folder, then a `video_qa_sample` per {question, answer} in qa.json.
    Folders with no frames, no caption or an unreadable frame are skipped and counted.
    """
    root = _require_dir(root, "video root")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise DataError(f"video root '{root}' has no subfolders; put each video in its own folder of frames with a caption.txt")
    if max_frames is not None and max_frames < 1:
        raise DataError(f"max_frames is {max_frames}; give a positive number of frames or None for all")
    return _videos(folders, max_frames, stats if stats is not None else ReadStats(), max_side)


def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_frames(folder: Path, max_frames: int | None, max_side: int | None) -> tuple[list[str], list[PILImage.Image]]:
    """A video folder's frame images, sorted by name, `max_frames` of them evenly spaced (all when None): (their file
    names, the pictures). DataError when the folder is missing, holds no frames, or one does not decode."""
    if not folder.is_dir():
        raise DataError(f"video folder '{folder}' does not exist; check the path")
    frames = _frame_files(folder)
    if not frames:
        raise DataError(f"video folder '{folder}' holds no frame images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    chosen = [frames[i] for i in _uniform(len(frames), max_frames)]
    return [p.name for p in chosen], [load_image(p, max_side) for p in chosen]


def _videos(folders: list[Path], max_frames, stats: ReadStats, max_side) -> Iterator[Sample]:
    for folder in folders:
        caption_file = folder / "caption.txt"
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
        if not _frame_files(folder) or not caption:
            stats.skip(f"video folder '{folder}' skipped: it needs frame images and a non-empty caption.txt")
            continue
        try:
            names, images = load_frames(folder, max_frames, max_side)
        except DataError as err:
            stats.skip(f"video folder '{folder}' skipped: {err}")
            continue
        meta = {"folder": folder.name, "frame_files": names}
        stats.samples += 1
        yield video_caption_sample(f"video_{folder.name}", images, caption, **meta)
        yield from _video_qa(folder, images, meta, stats)


def _video_qa(folder: Path, images, meta, stats: ReadStats) -> Iterator[Sample]:
    qa_file = folder / "qa.json"
    if not qa_file.is_file():
        return
    try:
        pairs = json.loads(qa_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        stats.skip(f"'{qa_file}' is not valid JSON ({err}); its questions are skipped")
        return
    if not isinstance(pairs, list):
        stats.skip(f"'{qa_file}' is not a list of {{question, answer}}; its questions are skipped")
        return
    for j, qa in enumerate(pairs):
        if not isinstance(qa, dict) or not isinstance(qa.get("question"), str) or not isinstance(qa.get("answer"), str):
            stats.skip(f"'{qa_file}' item {j} needs a string 'question' and 'answer'")
            continue
        stats.samples += 1
        yield video_qa_sample(f"video_{folder.name}_qa{j}", images, qa["question"], qa["answer"], **meta)


# ----------------------------------------------------------------------------------------------- LLaVA

LLAVA_ROLES = {"human": "user", "gpt": "assistant"}
PLACEHOLDERS = re.compile(r"(<image>|<video>)")


def read_llava(
    json_path: PathLike, image_dir: PathLike, *, max_frames: int | None = None, stats: ReadStats | None = None, max_side: int | None = None
) -> Iterator[Sample]:
    """One conversation sample per record of a LLaVA instruction-tuning JSON, a list of {"id", "image": a path or a
    list of paths, "video": a folder of frame images or a list of folders (paths relative to `image_dir`, both
    optional), "conversations": [{"from": "human" | "gpt" | "system" (first only), "value": text}, ...]}.

    Each `<image>` in the turns is the record's next image, each `<video>` its next video (its frames read as
    `read_video_folders` reads them, `max_frames` of them); LLaVA writes "<image>\n" before the question. A
    placeholder in a gpt turn is a picture the assistant draws. The turns alternate human, gpt, ... and end with
    gpt's; only gpt's text is learned. A record that breaks this, places more or fewer pictures than it lists, or
    names a file that is missing or does not decode is skipped and counted.
    """
    path = Path(json_path)
    records = _load_json(path, "LLaVA")
    if not isinstance(records, list):
        raise DataError(f"'{path}' is not a LLaVA file: it is a JSON {type(records).__name__}, not a list of records; give the LLaVA JSON")
    if max_frames is not None and max_frames < 1:
        raise DataError(f"max_frames is {max_frames}; give a positive number of frames or None for all")
    return _llava(records, path.name, _require_dir(image_dir, "LLaVA image directory"), max_frames, stats if stats is not None else ReadStats(), max_side)


def _llava(records: list[Any], source: str, image_dir: Path, max_frames, stats: ReadStats, max_side) -> Iterator[Sample]:
    for n, record in enumerate(records):
        try:
            sample = _llava_record(n, record, image_dir, max_frames, max_side)
        except DataError as err:
            ident = f" (id {record['id']!r})" if isinstance(record, dict) and "id" in record else ""
            stats.skip(f"{source} record #{n}{ident} skipped: {err}")
            continue
        sample.meta["source"] = source
        stats.samples += 1
        yield sample


def _paths(value: Any, field: str) -> list[str]:
    """A record's "image" or "video": absent, one path, or a list of paths."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise DataError(f"its '{field}' is a {type(value).__name__}; give a path or a list of paths")


def _llava_turns(conversations: Any) -> tuple[str, list[tuple[str, str]]]:
    """(system message, [(role, text), ...]) of a record's "conversations", checked to alternate user, assistant."""
    if not isinstance(conversations, list) or not conversations:
        raise DataError("it has no non-empty 'conversations' list")
    system, turns = "", []
    for k, turn in enumerate(conversations):
        role, value = (turn.get("from"), turn.get("value")) if isinstance(turn, dict) else (None, None)
        if not isinstance(value, str):
            raise DataError(f"turn {k} has no string 'value'")
        if role == "system" and k == 0:
            system = value
            continue
        if role not in LLAVA_ROLES:
            raise DataError(f"turn {k} is from {role!r}; a turn is from 'human' or 'gpt', or 'system' when it comes first")
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if LLAVA_ROLES[role] != expected:
            raise DataError(f"turn {k} is from {role!r}, but the turns must alternate human, gpt, human, ...")
        turns.append((LLAVA_ROLES[role], value))
    if not turns or turns[-1][0] != "assistant":
        raise DataError("its last turn is not from 'gpt'; end the conversation with the answer")
    if PLACEHOLDERS.search(system):
        raise DataError("its system message holds an <image> or <video>; place pictures in the human turns")
    return system, turns


def _llava_record(n: int, record: Any, image_dir: Path, max_frames, max_side) -> Sample:
    if not isinstance(record, dict):
        raise DataError(f"it is a JSON {type(record).__name__}, not an object")
    system, turns = _llava_turns(record.get("conversations"))
    images, videos = _paths(record.get("image"), "image"), _paths(record.get("video"), "video")
    placed = [p for _, text in turns for p in PLACEHOLDERS.findall(text)]
    if placed.count("<image>") != len(images) or placed.count("<video>") != len(videos):
        raise DataError(f"its turns place {placed.count('<image>')} <image> and {placed.count('<video>')} <video>, "
                        f"but it lists {len(images)} image(s) and {len(videos)} video(s)")
    pictures = iter([Image(load_image(image_dir / name, max_side)) for name in images])
    clips = iter([Video(load_frames(image_dir / name, max_frames, max_side)[1]) for name in videos])
    content = []
    for role, text in turns:
        parts: list[Segment] = []
        for piece in PLACEHOLDERS.split(text):
            if piece in ("<image>", "<video>"):
                parts.append(next(pictures if piece == "<image>" else clips))
            elif piece.strip():
                parts.append(Text(piece.strip()))
        content.append((role, parts))
    return conversation_sample(f"llava_{record.get('id', n)}", content, system, id=record.get("id"), images=images, videos=videos)


# ----------------------------------------------------------------------------------------------- convert

READERS: dict[str, Callable[..., Iterator[Sample]]] = {
    "coco": read_coco_captions,
    "vqav2": read_vqav2,
    "mmc4": read_mmc4,
    "video": read_video_folders,
    "llava": read_llava,
}


def convert(
    source: str,
    out_dir: PathLike,
    *,
    max_side: int | None = None,
    max_samples: int = 1000,
    prefix: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **paths: Any,
) -> dict[str, Any]:
    """Read `source` ("coco", "vqav2", "mmc4", "video", "llava") with its reader's arguments given as `paths`
    (e.g. annotations_json=..., image_dir=...) and write it to shards in `out_dir`; return a summary."""
    if source not in READERS:
        raise DataError(f"unknown data source '{source}'; choose one of {', '.join(READERS)}")
    reader = READERS[source]
    stats = ReadStats()
    try:
        inspect.signature(reader).bind(**paths, stats=stats, max_side=max_side)
    except TypeError as err:
        wanted = [p for p in inspect.signature(reader).parameters if p not in ("stats", "max_side")]
        raise DataError(f"'{source}' takes {', '.join(wanted)} ({err}); give those paths") from err
    samples = reader(**paths, stats=stats, max_side=max_side)  # raises DataError before any shard is written
    with ShardWriter(out_dir, prefix=prefix or source, max_samples=max_samples, overwrite=overwrite) as writer:
        for sample in tqdm(samples, desc=f"{source} -> shards", unit="sample", disable=not progress):
            writer.write(sample)
    return {
        "out_dir": str(out_dir),
        "samples": writer.total,
        "skipped": stats.skipped,
        "errors": stats.errors[:5],
        "shards": [p.name for p in writer.paths],
        "counts": dict(writer.counts),
    }

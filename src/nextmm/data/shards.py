"""WebDataset shards: the one on-disk format for all training data.

A shard is a plain tar file. One sample is the group of consecutive members that share a key:

    {key}.json      {"key": original key, "kind": ..., "segments": [...], "meta": {...}}
    {key}.000.png   the sample's pictures in reading order (video frames included), lossless PNG
    {key}.001.png   ...

A segment is `{"text": str, "target": bool}`, `{"image": i}`, `{"video": [i, j, ...]}` or `{"turn": role}`
(a conversation's turn, data/sample.py), where the numbers index the pictures. WebDataset splits a member name at the first dot of its basename, so the
key written to the tar is the sample key with every character other than letters, digits, `_` and `-`
replaced by `_`; the original key travels inside the JSON so a round trip gives it back unchanged.

Reading never stops on bad data: a corrupt sample is skipped and counted in a `ReadStats`, and a
damaged tar yields what precedes the damage before the reader moves on to the next shard.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image as PILImage
from webdataset import TarWriter

from nextmm.data.sample import ROLES, Image, Sample, Text, Turn, Video
from nextmm.errors import UserError

PathLike = str | os.PathLike


class DataError(UserError):
    """A mistake in what the user gave us (a missing path, a file of the wrong format): say what to do."""


@dataclass
class ReadStats:
    """Counts shared by every reader, updated in place so a training loop or a converter can report them.

    `samples` counts samples yielded; `skipped` counts everything dropped (corrupt samples, bad records,
    missing images, damaged shards); `errors` keeps the first `max_errors` messages saying why.
    """

    samples: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)
    max_errors: int = 20

    def skip(self, message: str, count: int = 1) -> None:
        self.skipped += count
        if len(self.errors) < self.max_errors:
            self.errors.append(message)

    def summary(self) -> str:
        text = f"{self.samples} samples read, {self.skipped} skipped"
        if self.errors:
            more = self.skipped - 1
            text += f"; first problem: {self.errors[0]}" + (f" (and {more} more)" if more > 0 else "")
        return text


# ---------------------------------------------------------------------------------------------- records

def shard_key(key: str) -> str:
    """The tar-safe form of a sample key (no dots, no slashes: WebDataset would split the key there)."""
    safe = re.sub(r"[^\w-]", "_", key)
    if not safe:
        raise DataError("a sample has an empty key; give every sample a non-empty key")
    return safe


def sample_to_record(sample: Sample) -> dict[str, Any]:
    """The JSON-ready description of `sample`, plus its pictures under "images" (PIL, reading order)."""
    segments: list[dict[str, Any]] = []
    images: list[PILImage.Image] = []
    for seg in sample.segments:
        if isinstance(seg, Text):
            segments.append({"text": seg.text, "target": bool(seg.target)})
        elif isinstance(seg, Image):
            segments.append({"image": len(images)})
            images.append(seg.image)
        elif isinstance(seg, Video):
            segments.append({"video": list(range(len(images), len(images) + len(seg.frames)))})
            images.extend(seg.frames)
        elif isinstance(seg, Turn):
            segments.append({"turn": seg.role})
        else:
            raise DataError(f"sample '{sample.key}' has a segment of type {type(seg).__name__}; use Text, Image, Video or Turn")
    return {"key": sample.key, "kind": sample.kind, "segments": segments, "meta": dict(sample.meta), "images": images}


def _check_record(record: Any, n_images: int) -> None:
    """Raise ValueError naming the first schema problem of a record (a corrupt sample, to be skipped)."""
    if not isinstance(record, dict):
        raise ValueError(f"record is a {type(record).__name__}, not an object")
    if not isinstance(record.get("kind"), str):
        raise ValueError("record has no string 'kind'")
    if not isinstance(record.get("meta", {}), dict):
        raise ValueError("record 'meta' is not an object")
    segments = record.get("segments")
    if not isinstance(segments, list) or not segments:
        raise ValueError("record has no non-empty 'segments' list")

    def index_ok(i: Any) -> bool:
        return isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_images

    for seg in segments:
        if not isinstance(seg, dict):
            raise ValueError(f"segment {seg!r} is not an object")
        if "text" in seg:
            if not isinstance(seg["text"], str) or not isinstance(seg.get("target", True), bool):
                raise ValueError(f"text segment {seg!r} needs a string 'text' and a boolean 'target'")
        elif "image" in seg:
            if not index_ok(seg["image"]):
                raise ValueError(f"image segment {seg!r} points outside the sample's {n_images} pictures")
        elif "video" in seg:
            frames = seg["video"]
            if not isinstance(frames, list) or not frames or not all(index_ok(i) for i in frames):
                raise ValueError(f"video segment {seg!r} needs frame indices within the sample's {n_images} pictures")
        elif "turn" in seg:
            if seg["turn"] not in ROLES:
                raise ValueError(f"turn segment {seg!r} names no role of {', '.join(ROLES)}")
        else:
            raise ValueError(f"segment {seg!r} is none of text, image, video, turn")


def record_to_sample(record: dict[str, Any]) -> Sample:
    """Inverse of `sample_to_record`; raises ValueError if the record is malformed."""
    images = record.get("images", []) if isinstance(record, dict) else []
    _check_record(record, len(images))
    segments = []
    for seg in record["segments"]:
        if "text" in seg:
            segments.append(Text(seg["text"], seg.get("target", True)))
        elif "image" in seg:
            segments.append(Image(images[seg["image"]]))
        elif "turn" in seg:
            segments.append(Turn(seg["turn"]))
        else:
            segments.append(Video([images[i] for i in seg["video"]]))
    return Sample(str(record.get("key", "")), record["kind"], segments, dict(record.get("meta", {})))


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays (common in generated meta) become plain numbers and lists.
    for name in ("tolist", "item"):
        if hasattr(value, name):
            return getattr(value, name)()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _png_bytes(image: PILImage.Image) -> bytes:
    buf = io.BytesIO()
    (image if image.mode == "RGB" else image.convert("RGB")).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- writer

class ShardWriter:
    """Write samples to `out_dir/{prefix}-{n:05d}.tar`, `max_samples` per shard, plus `index.json`.

    Each shard is written as `*.tar.tmp` and renamed when complete, so a killed writer never leaves a
    truncated file under a shard name (readers only look at `*.tar`). If the with-block raises, the
    unfinished shard is deleted and no index is written; finished shards stay.
    """

    def __init__(self, out_dir: PathLike, prefix: str = "shard", max_samples: int = 1000, overwrite: bool = False):
        if max_samples < 1:
            raise DataError(f"max_samples is {max_samples}; a shard must hold at least one sample")
        if shard_key(prefix) != prefix:
            raise DataError(f"shard prefix '{prefix}' may only hold letters, digits, '_' and '-'")
        self.out_dir = Path(out_dir)
        self.prefix, self.max_samples = prefix, max_samples
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Old shards left beside new ones would be read as part of this data set.
        old = sorted(self.out_dir.glob(f"{prefix}-*.tar"))
        if old and not overwrite:
            raise DataError(f"'{self.out_dir}' already holds shards ({old[0].name}, ...); choose an empty directory or pass overwrite=True")
        for path in old:
            path.unlink()
        self.paths: list[Path] = []
        self.counts: Counter[str] = Counter()
        self.total = 0
        self._tar: TarWriter | None = None
        self._in_shard = 0
        self._keys: set[str] = set()
        self._closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _tmp(self) -> Path:
        return self.out_dir / f"{self.prefix}-{len(self.paths):05d}.tar.tmp"

    def write(self, sample: Sample) -> None:
        if self._closed:
            raise DataError("this ShardWriter is closed; open a new one to write more samples")
        record = sample_to_record(sample)
        images = record.pop("images")
        try:
            text = json.dumps(record, ensure_ascii=False, default=_json_default)
        except (TypeError, ValueError) as err:
            raise DataError(f"sample '{sample.key}' has meta that is not JSON serialisable ({err}); store plain numbers, strings, lists and dicts") from err
        key = shard_key(sample.key)
        # Keys only need to be unique within one tar (readers group consecutive members).
        base, n = key, 1
        while key in self._keys:
            key, n = f"{base}_{n}", n + 1
        member = {"__key__": key, "json": text.encode("utf-8")}
        for i, image in enumerate(images):
            member[f"{i:03d}.png"] = _png_bytes(image)
        if self._tar is None:
            self._tar = TarWriter(str(self._tmp()), encoder=False)
        self._tar.write(member)
        self._keys.add(key)
        self._in_shard += 1
        self.total += 1
        self.counts[sample.kind] += 1
        if self._in_shard >= self.max_samples:
            self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        tmp = self._tmp()
        final = tmp.with_suffix("")  # drop ".tmp"
        os.replace(tmp, final)
        self.paths.append(final)
        self._tar, self._in_shard, self._keys = None, 0, set()

    def close(self) -> list[Path]:
        if self._closed:
            return self.paths
        if self._tar is not None:
            self._finish_shard()
        self._closed = True
        index = {"shards": [p.name for p in self.paths], "counts": dict(self.counts), "total": self.total}
        tmp = self.out_dir / "index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, self.out_dir / "index.json")
        return self.paths

    def abort(self) -> None:
        """Drop the unfinished shard (if any); keep the finished ones; write no index."""
        if self._tar is not None:
            try:
                self._tar.close()
            finally:
                self._tmp().unlink(missing_ok=True)
                self._tar = None
        self._closed = True


# ---------------------------------------------------------------------------------------------- reader

def list_shards(paths_or_dir: PathLike | Iterable[PathLike]) -> list[Path]:
    """Resolve a shard path, a directory (its `*.tar`, sorted), a glob, or a list of those."""
    items = [paths_or_dir] if isinstance(paths_or_dir, (str, os.PathLike)) else list(paths_or_dir)
    if not items:
        raise DataError("no shard paths were given; pass a shard file, a directory of .tar shards or a glob")
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(path.glob("*.tar"))
            if not found:
                raise DataError(f"directory '{path}' holds no .tar shards; write some with `nextmm data ...` or point at the right directory")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        elif glob.has_magic(str(item)):
            found = sorted(Path(p) for p in glob.glob(str(item)) if Path(p).is_file())
            if not found:
                raise DataError(f"the pattern '{item}' matches no shard files; check the path")
            out.extend(found)
        else:
            raise DataError(f"shard path '{path}' does not exist; check the path or write shards with `nextmm data ...`")
    return out


_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset's rule: key ends at the basename's first dot


def _groups(path: Path, stats: ReadStats) -> Iterator[tuple[str, dict[str, bytes]]]:
    # Streaming tarfile rather than webdataset's pipeline: we need to know exactly where a damaged tar
    # fails, yield everything before it and go on with the next shard, which webdataset's handlers blur.
    key, group, done = None, {}, 0
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                match = _MEMBER.match(member.name)
                if match is None:
                    continue
                data = tar.extractfile(member).read()
                if match.group(1) != key:
                    if group:
                        yield key, group
                        done += 1
                    key, group = match.group(1), {}
                group[match.group(2)] = data
        if group:
            yield key, group
    except (tarfile.TarError, EOFError, OSError) as err:
        stats.skip(f"{path.name}: damaged after {done} samples ({err}); continuing with the next shard")


def _parse(key: str, group: dict[str, bytes]) -> dict[str, Any]:
    """Raw tar group -> record whose "images" are still PNG bytes; raises ValueError when corrupt."""
    if "json" not in group:
        raise ValueError("no .json member")
    record = json.loads(group["json"].decode("utf-8"))
    pictures: dict[int, bytes] = {}
    for ext, data in group.items():
        stem = ext.split(".", 1)[0]
        if ext != "json" and stem.isdigit():
            pictures[int(stem)] = data
    if sorted(pictures) != list(range(len(pictures))):
        raise ValueError(f"picture members are not numbered 0..{len(pictures) - 1}: {sorted(pictures)}")
    _check_record(record, len(pictures))
    # PIL's verify() reads chunk headers and checksums without decompressing pixels: cheap enough to do
    # before the shuffle buffer, so that `skip=` counts the same samples a full read would have yielded.
    for i in range(len(pictures)):
        with PILImage.open(io.BytesIO(pictures[i])) as im:
            im.verify()
    record["images"] = [pictures[i] for i in range(len(pictures))]
    return record


def _decode(record: dict[str, Any], pixels: bool = True) -> Sample:
    images = []
    for data in record["images"]:
        if not pixels:  # opened, its size and mode read from the header; the pixels wait for load_pictures
            images.append(PILImage.open(io.BytesIO(data)))
            continue
        with PILImage.open(io.BytesIO(data)) as im:
            images.append(im.convert("RGB"))
    return record_to_sample(dict(record, images=images))


def load_pictures(sample: Sample) -> None:
    """Decode the pixels of a sample read with `read_shards(..., pixels=False)`, in place; raises what the image
    decoder raises for pixels that passed verify() but do not decode (a truncated JPEG)."""
    for seg in sample.segments:
        for picture in [seg.image] if isinstance(seg, Image) else seg.frames if isinstance(seg, Video) else []:
            picture.load()


def read_shards(
    paths_or_dir: PathLike | Iterable[PathLike],
    *,
    shuffle_buffer: int = 0,
    seed: int = 0,
    skip: int = 0,
    stats: ReadStats | None = None,
    pixels: bool = True,
) -> Iterator[Sample]:
    """Stream the samples of one or more shards (pictures as RGB PIL images); never raises on bad data.
    `pixels=False` leaves each picture's pixels undecoded until `load_pictures`, for a reader that keeps only some
    of the samples it reads (a rank of data-parallel training keeps its part of each batch).

    Bad paths raise DataError here, at call time. `shuffle_buffer` > 0 shuffles within a buffer of that
    many samples with `random.Random(seed)`. `skip` drops the first N good samples of that (shuffled)
    order without decoding their pictures, so a resumed run with the same seed continues where it stopped.
    """
    paths = list_shards(paths_or_dir)
    return _read(paths, shuffle_buffer, seed, skip, stats if stats is not None else ReadStats(), pixels)


def _records(paths: list[Path], stats: ReadStats) -> Iterator[dict[str, Any]]:
    for path in paths:
        for key, group in _groups(path, stats):
            try:
                yield _parse(key, group)
            except Exception as err:  # any decoding failure of one sample: skip it, keep reading
                stats.skip(f"{path.name}: sample '{key}' skipped ({type(err).__name__}: {err})")


def _shuffled(records: Iterator[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    buffer: list[dict[str, Any]] = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = record
    rng.shuffle(buffer)
    yield from buffer


def _read(paths: list[Path], shuffle_buffer: int, seed: int, skip: int, stats: ReadStats, pixels: bool) -> Iterator[Sample]:
    records = _records(paths, stats)
    if shuffle_buffer > 0:
        records = _shuffled(records, shuffle_buffer, random.Random(seed))
    for n, record in enumerate(records):
        if n < skip:
            continue
        try:
            sample = _decode(record, pixels)
        except Exception as err:  # pixels that passed verify() but fail to decode
            stats.skip(f"sample '{record.get('key')}' skipped while decoding ({type(err).__name__}: {err})")
            continue
        stats.samples += 1
        yield sample

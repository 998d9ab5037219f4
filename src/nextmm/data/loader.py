"""Training batches drawn from several shard sources, mixed by weight, resumable to the sample.

A data directory is either one source (it holds `*.tar` shards) or several (each sub-directory with
shards is a source named after it: `nextmm data shapes` writes one per sample kind). Each batch comes
from one source picked by weight with a seeded RNG, so the mix is a setting rather than an accident of
file sizes; one source per batch because sources differ a lot in length (a caption is ~25 tokens, an
8-frame video ~95) and a mixed batch would be mostly padding. `join_at` holds a source back for its
first batches (a curriculum: see PretrainConfig.join_at). `views` reads a source's samples again under
another name, changed by a function (stage 1 reads caption pairs text-first to learn text-to-image).
Bad samples never stop a run: unreadable ones are skipped by the shard reader, ones too long for the
context (or otherwise unusable for the stage) are skipped here, and both are counted in `report()`;
samples a stage leaves out by choice (`LeftOut`) are counted apart. A source none of whose samples a
stage can use stops the run with a message rather than looping forever. `part` = (rank, world) makes the
stream one rank's part of every batch under data-parallel training (train/parallel.py).
"""

from __future__ import annotations

import queue
import random
import threading
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from nextmm.data.sample import Sample
from nextmm.data.shards import DataError, ReadStats, load_pictures, read_shards
from nextmm.data.sequence import SequenceTooLong


class LeftOut(Exception):
    """Raised by a stage's item function for a good sample that the stage does not train on (its
    message says which setting leaves it out)."""


def discover_sources(data_dir: str | Path) -> dict[str, Path]:
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory '{root}' does not exist; make one with `nextmm data shapes --out {root}` or `nextmm data coco ...`")
    if any(root.glob("*.tar")):
        return {root.name: root}
    sources = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and any(p.glob("*.tar"))}
    if not sources:
        raise DataError(f"data directory '{root}' holds no .tar shards (nor sub-directories with shards); write some with `nextmm data ...`")
    return sources


class MixedStream:
    def __init__(
        self,
        sources: dict[str, Path],
        weights: dict[str, float],
        make_item: Callable[[Sample], Any],
        collate: Callable[[list[Any]], dict[str, torch.Tensor]],
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 512,
        unusable: tuple[type[Exception], ...] = (SequenceTooLong,),
        join_at: dict[str, int] | None = None,
        views: dict[str, tuple[str, Callable[[Sample], Sample]]] | None = None,
        part: tuple[int, int] = (0, 1),
    ):
        if batch_size % part[1]:
            raise DataError(f"a batch of {batch_size} samples does not split evenly among {part[1]} processes; make it a multiple of {part[1]}")
        views = {name: view for name, view in (views or {}).items() if view[0] in sources}
        self.sources = {**sources, **{name: sources[base] for name, (base, _) in views.items()}}
        self.change = {name: change for name, (_, change) in views.items()}
        self.names = [n for n in self.sources if weights.get(n, 1.0) > 0]
        if not self.names:
            raise DataError(f"every data source ({', '.join(self.sources)}) has mix weight 0; give at least one a positive weight")
        self.weights = [weights.get(n, 1.0) for n in self.names]
        self.join_at = {n: (join_at or {}).get(n, 0) for n in self.names}
        self.batches = 0
        self.make_item, self.collate = make_item, collate
        self.batch_size, self.seed, self.shuffle_buffer, self.part = batch_size, seed, shuffle_buffer, part
        self.rng = random.Random(seed)
        self.consumed = {n: 0 for n in self.names}
        self.used = {n: 0 for n in self.names}  # samples batched in the current epoch of each source
        self.epoch = {n: 0 for n in self.names}
        self.stats = ReadStats()
        self.unusable_errors = unusable
        self.unusable = 0
        self.left_out = 0
        self.last_reason = ""
        self._iters: dict[str, Iterator[Sample]] = {}

    def _open(self, name: str) -> Iterator[Sample]:
        seed = self.seed + 7919 * self.epoch[name] + zlib.crc32(name.encode())
        # skip= drops what a resumed run already consumed, after shuffling, so the order matches the first run.
        return read_shards(self.sources[name], shuffle_buffer=self.shuffle_buffer, seed=seed, skip=self.consumed[name], stats=self.stats, pixels=False)

    def _next_sample(self, name: str) -> Sample:
        for _ in range(2):
            if name not in self._iters:
                self._iters[name] = self._open(name)
            sample = next(self._iters[name], None)
            if sample is not None:
                self.consumed[name] += 1
                return sample
            if self.consumed[name] == 0:
                raise DataError(f"data source '{self.sources[name]}' has no readable samples ({self.stats.summary()})")
            if self.used[name] == 0:
                raise DataError(f"data source '{self.sources[name]}' has no sample this stage can use (the last one: {self.last_reason}); change that setting or the data")
            del self._iters[name]
            self.epoch[name] += 1
            self.consumed[name] = 0
            self.used[name] = 0
        raise AssertionError("unreachable: a non-empty source re-opened empty")

    def next_batch(self) -> dict[str, torch.Tensor]:
        items, drawn = [], []
        joined = [i for i, n in enumerate(self.names) if self.join_at[n] <= self.batches] or range(len(self.names))
        name = self.names[self.rng.choices(joined, [self.weights[i] for i in joined])[0]]
        self.batches += 1
        while len(items) < self.batch_size:
            sample = self._next_sample(name)  # outside the try: its "nothing usable" error must stop the run
            try:
                if name in self.change:
                    sample = self.change[name](sample)
                items.append(self.make_item(sample))
                drawn.append(sample)
                self.used[name] += 1
            except LeftOut as err:
                self.left_out += 1
                self.last_reason = str(err)
            except self.unusable_errors as err:
                self.unusable += 1
                self.last_reason = str(err)
                if len(self.stats.errors) < 20:
                    self.stats.errors.append(str(err))
        # Every rank draws the same global batch from the same seed and keeps its own contiguous slice: no sample
        # is seen twice or skipped, the slices joined are the one-process batch, and the stream's position is the
        # same on every rank, so rank 0's checkpoint resumes them all. Each rank reads and tokenises the whole batch
        # but decodes the pictures of its own slice alone, the costly part, which then costs no more with more ranks.
        rank, world = self.part
        share = len(items) // world
        mine = [items[i] for i in range(rank * share, (rank + 1) * share) if self._decoded(drawn[i])]
        if not mine:
            raise DataError(f"no picture of a batch's {share} samples from source '{name}' could be decoded ({self.stats.summary()}); check the data")
        return self.collate(mine)

    def _decoded(self, sample: Sample) -> bool:
        """Whether the sample's pictures decode; one that does not leaves its batch a sample short, skipped and counted."""
        try:
            load_pictures(sample)
            return True
        except Exception as err:  # pixels that passed verify() but do not decode (a truncated JPEG)
            self.stats.skip(f"sample '{sample.key}' skipped while decoding ({type(err).__name__}: {err})")
            return False

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {
            "rng": [version, list(internal), gauss], "consumed": dict(self.consumed), "used": dict(self.used),
            "epoch": dict(self.epoch), "batches": self.batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.consumed.update(state["consumed"])
        self.used.update(state.get("used", state["consumed"]))
        self.epoch.update(state["epoch"])
        self.batches = state["batches"]
        self._iters.clear()

    def report(self) -> dict[str, Any]:
        return {"skipped": self.stats.skipped + self.unusable, "errors": self.stats.errors[:5], "left_out": self.left_out}


class Prefetcher:
    """Builds the next batches in a background thread while the model trains on this one (decoding and
    tokenising are mostly Python, the model mostly native code that releases the GIL). Its state is the
    wrapped stream's state as of the last batch handed out, so a resumed run loses nothing. With `pin` (training on a
    GPU) the thread also puts each batch's tensors in page-locked memory, from which the copy to the GPU runs
    without holding up the training thread (device.to_device)."""

    def __init__(self, stream: MixedStream, depth: int = 2, pin: bool = False):
        self.stream = stream
        self.depth = depth
        self.pin = pin
        self._queue: queue.Queue | None = None
        self._state = stream.state_dict()

    def _produce(self, q: queue.Queue) -> None:
        while True:
            try:
                batch = self.stream.next_batch()
                if self.pin:
                    batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
                item = (batch, self.stream.state_dict(), None)
            except Exception as err:  # handed to the consumer, which raises it in the training thread
                item = (None, None, err)
            q.put(item)
            if item[2] is not None:
                return

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._queue is None:
            self._queue = queue.Queue(maxsize=self.depth)
            threading.Thread(target=self._produce, args=(self._queue,), daemon=True).start()
        batch, state, err = self._queue.get()
        if err is not None:
            raise err
        self._state = state
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._queue is not None:
            raise RuntimeError("load_state_dict must come before the first batch")
        self.stream.load_state_dict(state)
        self._state = self.stream.state_dict()

    def report(self) -> dict[str, Any]:
        return self.stream.report()

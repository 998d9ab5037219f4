"""What the stage-1 benchmarks share (reference_emu.py, mfu.py, data_loading.py): Shapes World shards in a
folder, a preset's config (as it trains, or in the paper's composition), the stage-1 batch stream as
`train/stages.pretrain_stage` builds it, and a stage-1 training run through the real `Trainer` over
batches drawn beforehand, timed step by step.

Not a benchmark itself: the scripts beside it import it (`python benchmarks/<script>.py` puts this folder on
the import path).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from nextmm.config import Config, apply_overrides, make_config

# Every kind stage 1's mix reads (text_to_image is a view of the captions), a few hundred batches' worth.
COUNTS = {"caption": 600, "vqa": 60, "video_caption": 60, "video_qa": 40, "story": 60, "edit": 60, "binding": 60,
          "ground": 60, "itm": 60, "region_caption": 60, "detect": 60}

# The paper's Emu at a preset's shapes, as transformers' parts can also be composed (reference_emu.py): a CLIP
# layout tower read before its final norm, then Emu's ln_visual; the T5 decoder stack fed learned queries; the
# regression in the LLM's width (the official checkpoint's layout); no extra heads, so no head losses or
# location-token soft targets. The tower reads nextmm's [-1, 1] pixels as they are (mean and std 0.5).
PAPER = [
    "vision.kind=clip", "vision.final_norm=false", "vision.mean=[0.5,0.5,0.5]", "vision.std=[0.5,0.5,0.5]",
    "resampler.kind=t5", "resampler.seed=none", "emu.regress_in=llm", "emu.visual_norm=true",
    *(f"heads.{name}=false" for name in ("location", "pointer", "pointer_words", "pointer_roles", "copy", "presence", "agreement", "words_to_visual")),
    "pretrain.pointer_weight=0", "pretrain.point_at_named=false", "pretrain.point_at_objects=false", "pretrain.location_sigma=0",
]

# A ~1B shape (benchmarks/load_parts.py's `1b`): TinyLlama's 1.1B LLM, a ViT-L/14 tower at 224 px and the emu-14b
# preset's 12-block causal transformer (T5-base, 32 queries); a 32000-word vocabulary. On top of the paper's
# composition; `llm.vocab_size` is read by `build` (the tokenizer's words fill the first rows).
ONE_B = [
    "vision.image_size=224", "vision.patch_size=14", "vision.width=1024", "vision.layers=24", "vision.heads=16", "vision.mlp_ratio=4.0",
    "resampler.num_queries=32", "resampler.width=768", "resampler.layers=12", "resampler.heads=12", "resampler.head_width=64", "resampler.mlp_ratio=4.0",
    "llm.width=2048", "llm.layers=22", "llm.heads=32", "llm.kv_heads=4", "llm.mlp_hidden=5632", "llm.max_seq_len=2048", "llm.tie_embeddings=false",
    "llm.vocab_size=32000", "tokenizer.location_bins=0", "pretrain.batch_size=2",
]
SHAPES = {"small": ("small", PAPER), "tiny": ("tiny", PAPER), "1b": ("small", PAPER + ONE_B)}


def shape_config(shape: str, paper: bool = True, overrides: list[str] = ()) -> Config:
    """`shape`: a preset (`micro`, `tiny`, `small`) or `1b`; `paper` puts it in the paper's composition (always
    for 1b); `overrides` (dotted, as `nextmm train --set`) go on top."""
    preset, extra = SHAPES.get(shape, (shape, PAPER))
    return apply_overrides(make_config(preset), [*(extra if paper or shape == "1b" else []), *overrides])


def write_data(root: str | Path, counts: dict[str, int] = COUNTS, seed: int = 0) -> Path:
    """Shapes World shards, one folder per kind, under `root`."""
    from nextmm.data.make import write_shapes

    write_shapes(root, counts, seed=seed, shard_size=1000, overwrite=True)
    return Path(root)


def tokenizer_for(data: str | Path, cfg: Config, path: str | Path | None = None):
    """Stage 1's tokenizer trained on the shards (as `nextmm train` trains it); saved to / read from `path`
    when given, so that several processes share one."""
    from nextmm.data.loader import discover_sources
    from nextmm.tokenizer import NextTokenizer
    from nextmm.train.stages import train_tokenizer

    if path is not None and Path(path).is_file():
        return NextTokenizer.load(path)
    tok = train_tokenizer(discover_sources(data), cfg)
    if path is not None:
        tok.save(path)
    return tok


def build(cfg: Config, tok):
    """The Emu model `nextmm train` builds; a vocabulary wider than the tokenizer's (`llm.vocab_size`, as a
    pretrained LLM's) keeps its width."""
    from nextmm.models.emu import Emu

    cfg.llm.vocab_size = max(cfg.llm.vocab_size, tok.vocab_size)
    return Emu(cfg, tok.image_id, tok.bin_ids, tok.special_ids)


def stage1_stream(cfg: Config, tok, data: str | Path, batch_size: int | None = None, curriculum: bool = False, part: tuple[int, int] = (0, 1)):
    """The stage-1 MixedStream exactly as `pretrain_stage` makes it (train/stages.pretrain_stream); without
    `curriculum` every source is in the mix from the first batch (join_at cleared), so that a few batches show the
    steady state of stage 1 rather than its caption-only start. `part` = (rank, world): one rank's part of every
    batch."""
    from nextmm.data.loader import discover_sources
    from nextmm.train.stages import pretrain_stream

    p = cfg.pretrain
    return pretrain_stream(cfg, tok, discover_sources(data), batch_size or p.batch_size, p.join_at if curriculum else {}, part)


class Drawn:
    """Batches drawn beforehand, served as a Trainer's stream (train/loop.BatchStream), in order, cycling."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]):
        self.batches, self.i = batches, 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.i = state["i"]

    def report(self) -> dict[str, Any]:
        return {"skipped": 0}


def batch_counts(batches: list[dict[str, torch.Tensor]]) -> dict[str, int]:
    """Non-pad tokens, padded tokens, samples and images (video frames counted) in some batches."""
    return {
        "tokens": sum(int(b["valid"].sum()) for b in batches),
        "padded_tokens": sum(b["valid"].numel() for b in batches),
        "samples": sum(int(b["input_ids"].shape[0]) for b in batches),
        "images": sum(int(b["pixels"].shape[0]) for b in batches),
    }


def run_trainer(model: torch.nn.Module, loss_fn: Callable, cfg: Config, batches: list[dict[str, torch.Tensor]], warmup: int,
                groups: list[dict] | None = None, backward: Callable | None = None, clip_apart: tuple[str, ...] = ()) -> dict[str, Any]:
    """`len(batches)` stage-1 steps through nextmm's own `Trainer` (AdamW, the schedule, clipping, autocast in
    `pretrain.precision`), timed by its after-step hook; the first `warmup` steps are left out of the figures.
    Its checkpoint is not written (the run is thrown away), nor does anything read the data meanwhile."""
    from nextmm.train.loop import Trainer

    stamps: list[float] = []
    settings = cfg.pretrain
    settings.steps, settings.time_budget_s, settings.log_every, settings.ckpt_every = len(batches), 0, 10**9, 0
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer("bench", model, loss_fn, settings, Path(out), groups=groups, after_step=lambda: stamps.append(time.perf_counter()),
                          backward=backward, clip_apart=clip_apart)
        trainer._checkpoint = lambda *args: None  # a thrown-away run: no checkpoint (GBs at the 1b shape)
        with contextlib.redirect_stdout(sys.stderr):  # its progress lines: stdout is the benchmark's JSON
            result = trainer.run(Drawn(batches))
    if warmup < 1:
        raise ValueError("run_trainer needs a warm-up step: the first step's end starts the clock")
    measured = batches[warmup:]
    span = stamps[-1] - stamps[warmup - 1]
    counts = batch_counts(measured)
    steps = sorted(b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:]))
    return {
        "steps": len(measured), "warmup_steps": warmup, "step_s": round(span / len(measured), 4), "step_s_median": round(steps[len(steps) // 2], 4),
        "tokens_per_s": round(counts["tokens"] / span, 1), "samples_per_s": round(counts["samples"] / span, 2),
        "last_loss": result.last.get("loss"),
    }


def peak_rss_mib() -> float:
    """This process's peak resident memory so far."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def set_threads(count: int) -> int:
    """Compute threads for this process (0: PyTorch's default, one per core); the count in force."""
    if count:
        torch.set_num_threads(count)
    return torch.get_num_threads()

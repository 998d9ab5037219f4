"""Stage-1 step time with a frozen vision tower, with and without its cache (`pretrain.tower_cache_gb`,
train/tower_cache.py).

The same stage-1 batches of Shapes World go through nextmm's Trainer twice in a row (two epochs); the figures are
those of the second epoch, in which every picture has been seen: without the cache the tower runs on every
picture, with it on none. The tower is frozen as `pretrain.vision_lr_scale=0` freezes it.
Usage: python benchmarks/tower_cache.py [--preset small] [--batches 6] [--threads 0]. Prints JSON.
"""

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import build, run_trainer, set_threads, shape_config, stage1_stream, tokenizer_for, write_data  # noqa: E402


def epochs(cfg, tok, batches: list, gib: float) -> dict:
    from nextmm.train.stages import pretrain_groups, pretrain_objective
    from nextmm.train.tower_cache import tower_cache

    torch.manual_seed(0)
    model = build(cfg, tok)
    _, loss_fn, backward = pretrain_objective(model, cfg.pretrain)
    groups = pretrain_groups(model, cfg.pretrain)  # freezes the tower
    with contextlib.redirect_stdout(sys.stderr), tower_cache(model.vision, gib) as cache:  # its summary line: stdout is the JSON
        result = run_trainer(model, loss_fn, cfg, batches * 2, warmup=len(batches), groups=groups, backward=backward)
    return {**result, "cache": None if cache is None else {"hits": cache.hits, "misses": cache.misses, "gib": round(cache.bytes / 2**30, 3)}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    threads = set_threads(args.threads)
    cfg = shape_config(args.preset, paper=False, overrides=["pretrain.vision_lr_scale=0"])
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp) / "data")
        tok = tokenizer_for(data, cfg)
        stream = stage1_stream(cfg, tok, data)
        batches = [stream.next_batch() for _ in range(args.batches)]
    plain = epochs(cfg, tok, batches, 0)
    cached = epochs(cfg, tok, batches, 4.0)
    print(json.dumps({
        "preset": args.preset, "threads": threads, "precision": cfg.pretrain.precision, "batches_per_epoch": args.batches,
        "second_epoch": {"no_cache": plain, "cache": cached}, "speedup": round(plain["step_s"] / cached["step_s"], 3),
        "same_last_loss": plain["last_loss"] == cached["last_loss"],
    }, indent=1))


if __name__ == "__main__":
    main()

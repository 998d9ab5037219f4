"""Stage-1 data loading against what training consumes: the samples/s the stage-1 stream makes alone (the
`MixedStream` that `pretrain_stage` builds, behind its `Prefetcher` thread: reading the Shapes World shards,
shuffling, decoding the PNGs, tokenising and collating into padded batches) over the samples/s a stage-1
training step takes at each preset (the preset as it trains, on batches drawn beforehand, through the real
`Trainer`). A ratio of 3 or more leaves the loader room to keep up while it shares the CPU with the step.

The stream is the preset's own (its batch size, mix, image size and queries); every source is in the mix
from the first batch (no join_at curriculum), as in the steady state of stage 1. Loading is timed after
`--warmup-batches` batches (the shards opened, the shuffle buffers filled). With `--ranks`, the loading of one
rank among that many is timed too: it reads and tokenises every global batch but decodes only its own part's
pictures, and its samples/s counts its own part (what its training step consumes).

    python benchmarks/data_loading.py                    # tiny and small
    python benchmarks/data_loading.py --presets tiny --batches 40 --steps 6

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import _common


def loading(cfg, tok, data, batches: int, warmup: int, prefetch: bool, ranks: int = 1) -> dict:
    """Samples/s (and batches/s, tokens/s) of the stage-1 stream alone, as rank 0 of `ranks` reads it."""
    from nextmm.data.loader import Prefetcher

    stream = _common.stage1_stream(cfg, tok, data, batch_size=cfg.pretrain.batch_size * ranks, part=(0, ranks))
    source = Prefetcher(stream) if prefetch else stream
    for _ in range(warmup):
        source.next_batch()
    start = time.perf_counter()
    drawn = [source.next_batch() for _ in range(batches)]
    span = time.perf_counter() - start
    counts = _common.batch_counts(drawn)
    return {"batches": batches, "samples_per_s": round(counts["samples"] / span, 1), "batches_per_s": round(batches / span, 2),
            "images_per_s": round(counts["images"] / span, 1), "tokens_per_s": round(counts["tokens"] / span, 1)}


def training(cfg, tok, data, steps: int, warmup: int) -> dict:
    """Samples/s of stage-1 training steps (the preset's model, objective and optimizer groups)."""
    from nextmm.train.stages import pretrain_groups, pretrain_objective

    torch.manual_seed(0)
    stream = _common.stage1_stream(cfg, tok, data)
    batches = [stream.next_batch() for _ in range(warmup + steps)]
    torch.manual_seed(1)
    model = _common.build(cfg, tok)
    _, loss_fn, backward = pretrain_objective(model, cfg.pretrain)
    run = _common.run_trainer(model, loss_fn, cfg, batches, warmup, groups=pretrain_groups(model, cfg.pretrain), backward=backward,
                              clip_apart=("heads.location.pointer.",))
    return {k: run[k] for k in ("steps", "step_s", "step_s_median", "samples_per_s", "tokens_per_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batches", type=int, default=24, help="batches timed from the stream")
    parser.add_argument("--warmup-batches", type=int, default=4)
    parser.add_argument("--no-prefetch", action="store_true", help="time the MixedStream itself, without the Prefetcher thread")
    parser.add_argument("--steps", type=int, default=4, help="training steps timed per preset, after one of warm-up")
    parser.add_argument("--threads", type=int, default=0, help="compute threads (0: PyTorch's default, one per core)")
    parser.add_argument("--ranks", type=int, nargs="*", default=[8], help="also time one rank's loading among this many, each with the preset's batch")
    args = parser.parse_args()
    threads = _common.set_threads(args.threads)

    from nextmm.precision import resolve

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        _common.write_data(tmp)
        for preset in args.presets:
            cfg = _common.shape_config(preset, paper=False)
            tok = _common.tokenizer_for(tmp, cfg, Path(tmp) / f"tokenizer-{preset}.json")
            cfg.llm.vocab_size = tok.vocab_size
            load = loading(cfg, tok, tmp, args.batches, args.warmup_batches, not args.no_prefetch)
            train = training(cfg, tok, tmp, args.steps, 1)
            per_rank = {n: loading(cfg, tok, tmp, args.batches, args.warmup_batches, not args.no_prefetch, n)["samples_per_s"] for n in args.ranks}
            results.append({"preset": preset, "batch_size": cfg.pretrain.batch_size, "precision": resolve(cfg.pretrain.precision, "cpu"),
                            "loading": load, "training": train, "ratio": round(load["samples_per_s"] / train["samples_per_s"], 2),
                            "one_rank_of": {n: {"samples_per_s": v, "ratio": round(v / train["samples_per_s"], 2)} for n, v in per_rank.items()}})
    print(json.dumps({"benchmark": "data_loading", "threads": threads, "prefetcher": not args.no_prefetch, "results": results}, indent=2))


if __name__ == "__main__":
    main()

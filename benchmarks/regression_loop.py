"""Image-generation regression loop: KV-cached vs full recompute (Emu's official loop re-runs the whole
sequence for each of the N embeddings), at N = 32 and 64 visual embeddings, batch 1 and 8.

The weights are untrained (speed does not depend on them); the LLM and the prompt are the `tiny` preset's
unless --preset says otherwise. Usage: python benchmarks/regression_loop.py [--preset tiny] [--repeats 3].
Prints one JSON line per (N, batch).
"""

import argparse
import json
import time

import torch

from nextmm.api import build_model
from nextmm.config import make_config
from nextmm.data.sample import Text
from nextmm.data.sequence import SequenceBuilder
from nextmm.data.shapes import make_samples
from nextmm.generate import generate_visual
from nextmm.tokenizer import NextTokenizer

PROMPT = "a large red circle to the left of a small blue square"


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    texts = [seg.text for s in make_samples("caption", 0, 300) for seg in s.segments if isinstance(seg, Text)]
    for n in (32, 64):
        cfg = make_config(args.preset, overrides=[f"resampler.num_queries={n}"])
        tok = NextTokenizer.train(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.location_bins)
        torch.manual_seed(0)
        model = build_model(cfg, tok).eval()
        builder = SequenceBuilder.for_config(tok, cfg)
        one_at_a_time = None
        for batch in (1, 8):
            prompts = [[Text(PROMPT, target=False)]] * batch
            cached = best_time(lambda: generate_visual(model, builder, prompts, use_cache=True), args.repeats)
            full = best_time(lambda: generate_visual(model, builder, prompts, use_cache=False), args.repeats)
            one_at_a_time = one_at_a_time or full  # batch 1 comes first: the official loop makes one image at a time
            print(json.dumps({
                "preset": args.preset, "num_queries": n, "batch": batch, "threads": torch.get_num_threads(),
                "cached_s": round(cached, 4), "recompute_s": round(full, 4), "speedup": round(full / cached, 2),
                "cached_images_per_s": round(batch / cached, 2),
                "speedup_vs_official_loop": round(batch * one_at_a_time / cached, 2),
            }))


if __name__ == "__main__":
    main()

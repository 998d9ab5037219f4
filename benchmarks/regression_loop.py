"""Image-generation regression loop: KV-cached vs full recompute (Emu's official loop re-runs the whole
sequence for each of the N embeddings), at N = 32 and 64 visual embeddings, batch 1 and 8.

The weights are untrained (speed does not depend on them). Two prompts: a caption (text-to-image, ~12
tokens) and an in-context one (two images and their captions, then a caption: 2 x (N + 2) + ~40 tokens),
where recomputing the whole sequence for every embedding costs most.
Usage: python benchmarks/regression_loop.py [--presets tiny small] [--repeats 3]. Prints one JSON line per
(preset, N, prompt, batch).
"""

import argparse
import itertools
import json
import time

import torch

from nextmm.api import build_model
from nextmm.config import make_config
from nextmm.data.sample import Text
from nextmm.data.sequence import SequenceBuilder
from nextmm.generate import generate_visual
from nextmm.tokenizer import NextTokenizer
from nextmm.worlds.shapes.generator import make_samples

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
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    scenes = list(make_samples("caption", 0, 300))
    texts = [seg.text for s in scenes for seg in s.segments if isinstance(seg, Text)]
    in_context = [seg for s in scenes[:2] for seg in s.segments] + [Text(PROMPT, target=False)]
    for preset, n in itertools.product(args.presets, (32, 64)):
        cfg = make_config(preset, overrides=[f"resampler.num_queries={n}"])
        tok = NextTokenizer.train(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.location_bins)
        torch.manual_seed(0)
        model = build_model(cfg, tok).eval()
        builder = SequenceBuilder.for_config(tok, cfg)
        for name, prompt in (("text", [Text(PROMPT, target=False)]), ("in_context", in_context)):
            one_at_a_time = None
            for batch in (1, 8):
                prompts = [prompt] * batch
                cached = best_time(lambda: generate_visual(model, builder, prompts, use_cache=True), args.repeats)
                full = best_time(lambda: generate_visual(model, builder, prompts, use_cache=False), args.repeats)
                one_at_a_time = one_at_a_time or full  # batch 1 comes first: the official loop makes one image at a time
                print(json.dumps({
                    "preset": preset, "num_queries": n, "prompt": name, "prompt_tokens": len(builder.encode(prompt, close=False).ids) + 1,
                    "batch": batch, "threads": torch.get_num_threads(), "cached_s": round(cached, 4), "recompute_s": round(full, 4),
                    "speedup": round(full / cached, 2), "cached_images_per_s": round(batch / cached, 2),
                    "speedup_vs_official_loop": round(batch * one_at_a_time / cached, 2),
                }), flush=True)


if __name__ == "__main__":
    main()

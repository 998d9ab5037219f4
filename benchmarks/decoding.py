"""Greedy text decoding speed: nextmm's KV-cached decoding (`generate.generate_ids`, what `NextMM.generate`
runs) against `transformers`' `LlamaForCausalLM.generate` on the same weights, exported by nextmm's own
`convert/hf_llm.export_hf_llm` and read back with `from_pretrained`.

The model is a preset's Emu in the paper's composition (its LLM is a plain Llama: no heads add to its input or
scores), untrained, its tokenizer trained on Shapes World. Both sides decode N new tokens from the same
left-padded text prompts (batch 1 and 8, prompts of different lengths), in the same precision (fp32 by
default, as `NextMM` decodes; bf16 = autocast on both sides) and thread count; the clock includes the prompt's
prefill and, for transformers, its generation setup. Neither stops early: transformers is given no EOS, and
nextmm a copy of its tokenizer whose EOS and `[IMG]` ids match no token, so both write exactly N (an untrained
model may pick any token). Each side runs --repeats times, the two taking turns, and its best run counts.
Greedy parity: how many of the first tokens of every row agree.

    python benchmarks/decoding.py                                # small, N = 64, batch 1 and 8, best of 5
    python benchmarks/decoding.py --preset tiny --new-tokens 32 --batches 1 8 16 --precision bf16

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

import _common

PROMPTS = [
    "a large red circle above a small blue square",
    "what color is the triangle?",
    "two green diamonds and a yellow star on the left",
    "is there a purple square?",
    "the small orange circle moves to the right of the big blue triangle while the red square stays",
    "describe the picture",
    "a blue square",
    "how many circles are there in the picture, and what colors are they?",
]


def interleaved_best(fns: dict, repeats: int) -> dict:
    """name -> (best seconds, last output) of each function, after one warm-up call each; the repeats take turns,
    so that a busy spell on a shared machine falls on both sides rather than on one."""
    for fn in fns.values():
        fn()
    best = {name: (float("inf"), None) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            out = fn()
            best[name] = (min(best[name][0], time.perf_counter() - start), out)
    return best


def agreeing_prefix(a: list[list[int]], b: list[list[int]]) -> int:
    """How many leading tokens agree in every row."""
    n = 0
    while all(n < len(x) and n < len(y) and x[n] == y[n] for x, y in zip(a, b)):
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side, taking turns; the best counts")
    parser.add_argument("--threads", type=int, default=0, help="compute threads (0: PyTorch's default, one per core)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. llm.layers=12")
    args = parser.parse_args()
    threads = _common.set_threads(args.threads)

    from transformers import LlamaForCausalLM

    from nextmm.convert.hf_llm import export_hf_llm
    from nextmm.data.sample import Text
    from nextmm.data.sequence import SequenceBuilder
    from nextmm.generate import generate_ids
    from nextmm.precision import autocast, resolve

    precision = resolve(args.precision, "cpu")
    cfg = _common.shape_config(args.preset, overrides=args.set)
    with tempfile.TemporaryDirectory() as tmp:
        _common.write_data(Path(tmp) / "data")
        tok = _common.tokenizer_for(Path(tmp) / "data", cfg)
        torch.manual_seed(0)
        model = _common.build(cfg, tok).eval()
        export_hf_llm(model.llm, model.llm.cfg, tok, Path(tmp) / "hf", "LlamaForCausalLM")
        hf = LlamaForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()

    endless = copy.copy(tok)
    endless.eos_id = endless.img_id = -1  # no token ends a row: both sides write exactly N
    builder = SequenceBuilder.for_config(endless, cfg)
    n = args.new_tokens
    results = []
    for batch_size in args.batches:
        prompts = [[Text(PROMPTS[i % len(PROMPTS)], target=False)] for i in range(batch_size)]
        batch = builder.collate([builder.encode(p, close=False) for p in prompts], left_pad=True)

        def ours():
            return generate_ids(model, builder, prompts, n, use_cache=True, precision=precision)

        def theirs():
            with torch.no_grad(), autocast(precision):
                out = hf.generate(input_ids=batch["input_ids"], attention_mask=batch["valid"].long(), do_sample=False, max_new_tokens=n,
                                  eos_token_id=None, pad_token_id=tok.pad_id)
            return out[:, batch["input_ids"].shape[1]:].tolist()

        timed = interleaved_best({"nextmm": ours, "transformers": theirs}, args.repeats)
        (ours_s, ours_ids), (theirs_s, theirs_ids) = timed["nextmm"], timed["transformers"]
        if any(len(row) != n for row in ours_ids + theirs_ids):
            raise SystemExit(f"a side wrote other than {n} tokens: {[len(r) for r in ours_ids]} vs {[len(r) for r in theirs_ids]}")
        results.append({
            "batch": batch_size, "prompt_tokens": int(batch["valid"].sum()), "padded_prompt_len": batch["input_ids"].shape[1],
            "nextmm_s": round(ours_s, 4), "transformers_s": round(theirs_s, 4),
            "nextmm_tokens_per_s": round(batch_size * n / ours_s, 1), "transformers_tokens_per_s": round(batch_size * n / theirs_s, 1),
            "speedup": round(theirs_s / ours_s, 3), "greedy_agreeing_prefix": agreeing_prefix(ours_ids, theirs_ids),
            "identical_tokens": sum(a == b for x, y in zip(ours_ids, theirs_ids) for a, b in zip(x, y)) / (batch_size * n),
        })
    print(json.dumps({
        "benchmark": "decoding", "preset": args.preset, "llm_parameters_m": round(sum(p.numel() for p in model.llm.parameters()) / 1e6, 2),
        "precision": precision, "threads": threads, "new_tokens": n, "repeats": args.repeats, "transformers": __import__("transformers").__version__,
        "attention": hf.config._attn_implementation, "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()

"""Sequence packing (pretrain.pack_len, data/packing.py) on this machine's CPU. Prints JSON.

attention: per preset (tiny, small) and row length (256, 512), rows of documents 20-95 tokens long: the
matmul-softmax path with the block-diagonal bool mask (models/attention.py) against flex_attention with a block
mask, forward + backward in fp32; and, where flex_attention has no CPU backward, forward alone, compiled.
training: Shapes World shards written to a temporary directory, stage 1 at the `tiny` preset for --steps steps
without packing and with each of --pack-lens (the preset's context is 256): the share of token slots that is
padding (what one right-padded row per sample wastes, and what the packed rows waste) and non-pad tokens per
second over the logging windows after the first (the warm-up). --paper switches the extra heads off (the paper's
model), several of which compute over every pair of a row's positions.
Usage: python benchmarks/packing.py [--steps 30] [--pack-lens 128 256] [--paper] [--skip-attention] [--skip-training]
"""

import argparse
import contextlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

COUNTS = {"caption": 400, "vqa": 200, "video_qa": 60, "story": 60, "binding": 60, "ground": 60}
PRESETS = {"tiny": (4, 64), "small": (8, 64)}  # LLM (heads, head width)


def documents_in_rows(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """(rows, width) document indices of rows filled with documents 20-95 tokens long, the rest padding."""
    rng = random.Random(seed)
    documents = torch.full((rows, width), -1)
    number = 0
    for row in range(rows):
        at = 0
        while (length := rng.randint(20, 95)) <= width - at:
            documents[row, at : at + length] = number
            at, number = at + length, number + 1
    return documents


def time_ms(step, reps: int = 5) -> float:
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    return round((time.perf_counter() - start) / reps * 1000, 2)


def attention(rows: int = 4) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from nextmm.models.attention import attend
    from nextmm.models.llm import document_layout

    results = {}
    for preset, (heads, head_width) in PRESETS.items():
        for width in (256, 512):
            documents = documents_in_rows(rows, width)
            mask = document_layout(documents)[1]
            block_mask = create_block_mask(lambda b, h, q, k: (documents[b, q] == documents[b, k]) & (k <= q), rows, None, width, width, device="cpu")
            q, k, v = [torch.randn(rows, heads, width, head_width, requires_grad=True) for _ in range(3)]
            compiled = torch.compile(flex_attention)
            result = {"masked_fwd_bwd_ms": time_ms(lambda: attend(q, k, v, mask=mask).sum().backward())}
            try:
                flex_attention(q, k, v, block_mask=block_mask)  # uncompiled, it refuses at once where it has no backward
                result["flex_compiled_fwd_bwd_ms"] = time_ms(lambda: compiled(q, k, v, block_mask=block_mask).sum().backward())
            except NotImplementedError as err:
                result["flex_fwd_bwd"] = f"unsupported: {str(err).splitlines()[0][:160]}"
                q, k, v = q.detach(), k.detach(), v.detach()
                result["masked_fwd_ms"] = time_ms(lambda: attend(q, k, v, mask=mask))
                result["flex_compiled_fwd_ms"] = time_ms(lambda: compiled(q, k, v, block_mask=block_mask))
            results[f"{preset} (rows {rows}, heads {heads}, head width {head_width}), pack_len {width}"] = result
    return results


PAPER = [f"heads.{switch}=false" for switch in ("location", "pointer", "pointer_words", "pointer_roles", "copy", "presence", "agreement")]


def stage1(steps: int, pack_len: int, data: Path, out: Path, paper: bool) -> dict:
    from nextmm.config import make_config
    from nextmm.train.stages import train

    log_every = max(1, steps // 5)
    cfg = make_config("tiny", overrides=["clip.steps=0", "diffusion.steps=0", f"pretrain.steps={steps}", "pretrain.time_budget_s=0",
                                         f"pretrain.log_every={log_every}", f"pretrain.ckpt_every={steps * 10}", "pretrain.join_at={}",
                                         f"pretrain.pack_len={pack_len}", *(PAPER if paper else [])])
    with contextlib.redirect_stdout(sys.stderr):  # the stage's progress lines: stdout is the benchmark's JSON
        train(cfg, data, out)
    warmup, *records = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    mean = lambda key: round(sum(r[key] for r in records) / len(records), 4) if key in records[0] else None  # noqa: E731
    return {"pack_len": pack_len, "non_pad_tokens_per_s": mean("tokens_per_s"), "samples_per_s": mean("samples_per_s"),
            "pad_before": mean("pad_before"), "pad_after": mean("pad_after"), "final_loss": records[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pack-lens", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--paper", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-attention", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from nextmm.data.make import write_shapes

    torch.manual_seed(0)
    report = {"benchmark": "sequence_packing_cpu", "threads": torch.get_num_threads(), "torch": torch.__version__}
    if not args.skip_attention:
        report["attention"] = attention()
    if not args.skip_training:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            write_shapes(data, COUNTS, seed=0, shard_size=200)
            runs = [stage1(args.steps, pack_len, data, Path(tmp) / f"run{pack_len}", args.paper) for pack_len in (0, *args.pack_lens)]
        for run in runs[1:]:
            run["speedup"] = round(run["non_pad_tokens_per_s"] / runs[0]["non_pad_tokens_per_s"], 2)
        report["training_tiny" + (", heads off" if args.paper else "")] = runs
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Model FLOPs utilisation of stage-1 training on this machine's CPU or GPU (`--device`): the FLOP/s a training
step achieves over the FLOP/s of one large square matmul in the same dtype on the same device, measured in the same
process.

FLOPs are counted, not estimated: `torch.utils.flop_counter.FlopCounterMode` records every matmul,
convolution and attention of one forward + backward on each measured batch (the ops that run, at the
batch's padded shapes). Two counts per batch:
  model_flops     forward + one backward of the whole loss: the arithmetic the model needs (MFU's numerator)
  executed_flops  forward + the stage's own backward as it runs (by default two passes over the LLM: the L2
                  gradient for the language side alone, train/regression.py), so hardware FLOPs (HFU's)
For scale, the textbook estimate 6 * N * D (N the matmul parameters of each part, D the tokens through it:
the LLM's padded tokens, the tower's image tokens, the causal transformer's queries) plus attention's
12 * L * T^2 * d per sequence (forward 4 T^2 d: scores and the weighted sum; backward twice that) is printed
beside the count as `analytic_flops`.
Achieved FLOP/s = model_flops of the measured batches / the seconds the real `Trainer` took for them
(AdamW and clipping included, batches drawn beforehand). Peak = 2 * n^3 / the best of several n x n matmuls
(default 2048) in the precision the stage computes in (`auto`: bf16 where the device has fast bf16).
`pretrain.activation_checkpointing` and `pretrain.compile` (`--set`) apply as stage 1 applies them
(train/parallelize.py); on a GPU the peak memory the steps allocated is printed too.

    python benchmarks/mfu.py                       # small as it trains (its heads on), 4 steps after 1 of warm-up
    python benchmarks/mfu.py --paper --threads 1   # the paper's composition; one thread (a shared CPU)
    python benchmarks/mfu.py --preset 1b --device cuda --batch-size 8 --matmul 8192   # a ~1B shape on a GPU
    python benchmarks/mfu.py --preset 1b --device cuda --batch-size 8 --matmul 8192 --set pretrain.activation_checkpointing=1

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import _common


def matmul_peak(n: int, dtype: torch.dtype, repeats: int, device: torch.device) -> float:
    """FLOP/s of the best of `repeats` n x n x n matmuls on `device`."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def counted(model, loss_fn, backward, batch, precision: str, device: torch.device) -> int:
    """Matmul/attention FLOPs of one forward and `backward` on a batch; the gradients are thrown away."""
    from nextmm.device import to_device
    from nextmm.precision import autocast

    batch = to_device(batch, device)
    with FlopCounterMode(display=False) as counter:
        with autocast(precision, device.type):
            out = loss_fn(batch)
        backward(out)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def linear_params(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def analytic(model, cfg, batch) -> float:
    """6 N D per part plus 12 L T^2 d for each part's attention (see the docstring); embeddings are lookups
    and the LM head is counted on every position (as the textbook formula does)."""
    v, r, lm = cfg.vision, cfg.resampler, cfg.llm
    images, (rows, length) = batch["pixels"].shape[0], batch["input_ids"].shape
    tokens = rows * length
    image_tokens = images * v.num_tokens
    queries = images * r.num_queries
    head_width = r.head_width or r.width // r.heads
    flops = 6 * linear_params(model.vision) * image_tokens + 6 * 3 * v.patch_size**2 * v.width * images * (v.num_tokens - v.cls_tokens)
    flops += 12 * v.layers * v.num_tokens**2 * v.width * images
    for name, module in model.resampler.named_modules():  # keys, values and the patch projections read the image tokens
        if isinstance(module, torch.nn.Linear):
            reads_patches = ("cross" in name and name.split(".")[-1] in ("k", "v", "kv")) or name in ("patch_proj", "coord_proj")
            flops += 6 * module.weight.numel() * (image_tokens if reads_patches else queries)
    flops += 12 * r.layers * (r.num_queries**2 + r.num_queries * v.num_tokens) * r.heads * head_width * images
    flops += 6 * (linear_params(model.llm) + model.visual_proj.weight.numel()) * tokens + 6 * model.regression_head.weight.numel() * tokens
    flops += 12 * lm.layers * length**2 * lm.heads * lm.head_size * rows
    return flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--paper", action="store_true", help="the paper's composition (heads off) at the preset's shapes")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=0, help="0: the preset's")
    parser.add_argument("--matmul", type=int, default=2048, help="side of the square matmul that sets the peak")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="compute threads (0: PyTorch's default, one per core)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. pretrain.precision=fp32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = parser.parse_args()
    threads = _common.set_threads(args.threads)

    from nextmm.device import pick_device
    from nextmm.precision import resolve
    from nextmm.train import parallelize
    from nextmm.train.stages import pretrain_groups, pretrain_objective

    device = pick_device(args.device)

    cfg = _common.shape_config(args.preset, paper=args.paper, overrides=args.set)
    if args.batch_size:
        cfg.pretrain.batch_size = args.batch_size
    precision = resolve(cfg.pretrain.precision, device.type)
    with tempfile.TemporaryDirectory() as tmp:
        _common.write_data(tmp)
        tok = _common.tokenizer_for(tmp, cfg, Path(tmp) / "tokenizer.json")
        torch.manual_seed(0)
        stream = _common.stage1_stream(cfg, tok, tmp)
        batches = [stream.next_batch() for _ in range(args.warmup + args.steps)]
    torch.manual_seed(1)
    model = _common.build(cfg, tok).to(device)
    _, loss_fn, backward = pretrain_objective(model, cfg.pretrain)
    measured = batches[args.warmup:]
    model_flops = sum(counted(model, loss_fn, lambda out: out["loss"].backward(), b, precision, device) for b in measured)
    executed_flops = sum(counted(model, loss_fn, lambda out: backward(out, 1.0), b, precision, device) for b in measured)
    estimate = sum(analytic(model, cfg, b) for b in measured)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = matmul_peak(args.matmul, dtype, args.repeats, device)
    parallelize.checkpoint_blocks(model, cfg.pretrain.activation_checkpointing)  # counted above without: the model's FLOPs
    if cfg.pretrain.compile:
        parallelize.compile_blocks(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = _common.run_trainer(model, loss_fn, cfg, batches, args.warmup, groups=pretrain_groups(model, cfg.pretrain), backward=backward,
                              clip_apart=("heads.location.pointer.",))
    seconds = run["step_s"] * run["steps"]
    memory = {"peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)} if device.type == "cuda" else {}
    peak_after = matmul_peak(args.matmul, dtype, args.repeats, device)
    peak = max(peak, peak_after)  # timed before and after the steps: the better of the two is the machine's
    achieved = model_flops / seconds
    print(json.dumps({
        "benchmark": "mfu", "preset": args.preset, "composition": "paper" if args.paper else "preset", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "precision": precision, "threads": threads,
        "activation_checkpointing": cfg.pretrain.activation_checkpointing, "compile": cfg.pretrain.compile, **memory,
        "batch_size": cfg.pretrain.batch_size, "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        **{k: run[k] for k in ("steps", "step_s", "step_s_median", "tokens_per_s")}, "measured_batches": _common.batch_counts(measured),
        "model_gflop_per_step": round(model_flops / run["steps"] / 1e9, 2), "executed_gflop_per_step": round(executed_flops / run["steps"] / 1e9, 2),
        "analytic_gflop_per_step": round(estimate / run["steps"] / 1e9, 2),
        "achieved_gflop_s": round(achieved / 1e9, 2), "hardware_gflop_s": round(executed_flops / seconds / 1e9, 2),
        f"matmul_{args.matmul}_peak_gflop_s": round(peak / 1e9, 2),
        "mfu": round(achieved / peak, 4), "hfu": round(executed_flops / seconds / peak, 4),
    }, indent=2))


if __name__ == "__main__":
    main()

"""What sharding and activation checkpointing save (train/parallelize.py), on this machine's CPU.

At 2 processes, DDP against FSDP2: each rank's bytes of parameters and of AdamW's state, its peak RSS and the step
time. In one process, activation checkpointing off against on (every block): peak RSS and step time. Every
configuration runs stage 1's loss, backward and optimizer step on the same fresh Shapes World batches (each rank its
part of them) in processes of its own, so that each peak RSS is its own, for --steps steps after one warm-up step.
Usage: python benchmarks/fsdp_memory.py [--preset tiny] [--steps 4]. Prints JSON.
"""

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COUNTS = {"caption": 200, "vqa": 40, "binding": 40}
CONFIGS = {"ddp": (2, "pretrain.sharding=ddp"), "fsdp": (2, "pretrain.sharding=fsdp"),
           "one": (1, "pretrain.activation_checkpointing=0"), "one_checkpointed": (1, "pretrain.activation_checkpointing=1")}


def local_bytes(tensors) -> int:
    """The bytes this process holds of the tensors (a DTensor's own shard)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


def rank_main(rank: int, world: int, port: int, config: str, preset: str, steps: int, data: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    from nextmm.api import build_model
    from nextmm.config import make_config
    from nextmm.data.loader import MixedStream, discover_sources
    from nextmm.data.sequence import SequenceBuilder
    from nextmm.tokenizer import NextTokenizer
    from nextmm.train import parallel, parallelize
    from nextmm.train.stages import freeze_parts, pretrain_groups, pretrain_objective

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    with parallel.session("cpu", timeout_s=600):
        cfg = make_config(preset, overrides=["pretrain.precision=fp32", CONFIGS[config][1]])
        tok = NextTokenizer.load(Path(data) / "tokenizer.json")
        cfg.llm.vocab_size = tok.vocab_size
        torch.manual_seed(0)
        model = build_model(cfg, tok)
        p = cfg.pretrain
        builder = SequenceBuilder.for_config(tok, cfg)
        stream = MixedStream(discover_sources(Path(data) / "shards"), {}, lambda s: builder.encode(s.segments), builder.collate,
                             p.batch_size, 0, part=parallel.part())
        _, loss_fn, backward = pretrain_objective(model, p)
        freeze_parts(model, p)
        objective = parallelize.prepare(model, loss_fn, p, "fp32")
        if objective is None:
            objective = parallel.wrap(model, loss_fn)
        optimizer = torch.optim.AdamW(pretrain_groups(model, p))
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            backward(objective(stream.next_batch()), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        state = [t for entry in optimizer.state.values() for t in entry.values() if torch.is_tensor(t)]
        record = {"config": config, "rank": rank, "processes": world, "parameter_mib": round(local_bytes(model.parameters()) / 2**20, 2),
                  "optimizer_mib": round(local_bytes(state) / 2**20, 2), "step_s": round(sum(times[1:]) / steps, 3),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        Path(out, f"{config}-{rank}.json").write_text(json.dumps(record))


def run(config: str, preset: str, steps: int, data: str) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = CONFIGS[config][0]
    mp.spawn(rank_main, args=(world, port, config, preset, steps, data, data), nprocs=world)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run(args.one, args.preset, args.steps, args.data)
        return
    from nextmm.config import make_config
    from nextmm.data.loader import discover_sources
    from nextmm.data.make import write_shapes
    from nextmm.train.stages import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_shapes(Path(tmp) / "shards", COUNTS, seed=0, shard_size=1000)
        train_tokenizer(discover_sources(Path(tmp) / "shards"), make_config(args.preset)).save(Path(tmp) / "tokenizer.json")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
        for config in CONFIGS:  # each in a process of its own (its ranks spawned from it), so each peak RSS is its own
            subprocess.run([sys.executable, __file__, "--one", config, "--preset", args.preset, "--steps", str(args.steps), "--data", tmp],
                           env=env, check=True, stdout=subprocess.DEVNULL)
        results = [json.loads(path.read_text()) for path in sorted(Path(tmp).glob("*-*.json"))]
    print(json.dumps({"benchmark": "fsdp_memory", "preset": args.preset, "steps": args.steps, "results": results}, indent=2))


if __name__ == "__main__":
    main()

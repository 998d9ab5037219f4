"""Stage-1 training throughput at 1 and 2 processes on this machine (data-parallel, train/parallel.py).

Each run is `nextmm train` (`--nproc N` above 1) on the same fresh Shapes World shards, stage 1 only, with the
preset's global batch, for --steps steps; each process gets an equal share of the CPU's threads. Tokens/s and
samples/s are those of the metrics.jsonl windows after the first (the warm-up), summed over the ranks. A last
run, one process on one process's share of the threads, tells how much one process gains from more threads.
Usage: python benchmarks/ddp_scaling.py [--preset tiny] [--steps 40] [--nproc 1 2]. Prints JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COUNTS = {"caption": 600, "vqa": 60, "binding": 40, "story": 40}


def run(processes: int, threads: int, preset: str, steps: int, data: Path, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    command = [sys.executable, "-m", "nextmm.cli", "train", "--data", str(data), "--out", str(out), "--preset", preset,
               "--nproc", str(processes)]
    for setting in ("clip.steps=0", "diffusion.steps=0", f"pretrain.steps={steps}", "pretrain.time_budget_s=0",
                    f"pretrain.log_every={steps // 4}", f"pretrain.ckpt_every={steps * 10}"):
        command += ["--set", setting]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    warmup, *records = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    mean = lambda key: round(sum(r[key] for r in records) / len(records), 1)  # noqa: E731
    return {
        "processes": processes, "threads_per_process": threads, "tokens_per_s": mean("tokens_per_s"),
        "samples_per_s": mean("samples_per_s"),
        "s_per_step": round((records[-1]["elapsed_s"] - warmup["elapsed_s"]) / (records[-1]["step"] - warmup["step"]), 3),
        "wall_s": round(wall, 1), "final_loss": records[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from nextmm.config import make_config
    from nextmm.data.make import write_shapes

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_shapes(data, COUNTS, seed=0, shard_size=200)
        cpus = len(os.sched_getaffinity(0))
        configs = [(n, max(1, cpus // n)) for n in args.nproc]
        configs.append((1, configs[-1][1]))
        runs = [run(n, threads, args.preset, args.steps, data, Path(tmp) / f"run{k}") for k, (n, threads) in enumerate(configs)]
    base = runs[0]["tokens_per_s"]
    print(json.dumps({
        "preset": args.preset, "global_batch": make_config(args.preset).pretrain.batch_size, "steps": args.steps,
        "cpus": len(os.sched_getaffinity(0)), "runs": runs, "tokens_per_s_over_the_first": [round(r["tokens_per_s"] / base, 3) for r in runs],
    }, indent=2))


if __name__ == "__main__":
    main()

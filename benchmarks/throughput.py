"""Stage-1 training throughput (tokens/s, images/s, samples/s) and peak memory for each preset.

Each preset runs in its own process (so peak RSS is its own) on freshly generated Shapes World shards,
with the preset's batch size and precision, for a fixed number of steps after a warm-up.
Usage: python benchmarks/throughput.py [--presets micro tiny small] [--steps 20]. Prints JSON.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

COUNTS = {"caption": 400, "vqa": 40, "video_qa": 40, "story": 40, "binding": 40, "edit": 40, "video_caption": 40}


def measure(preset: str, steps: int, data: str) -> dict:
    import torch

    from nextmm.api import build_model
    from nextmm.config import make_config
    from nextmm.data.loader import MixedStream, discover_sources
    from nextmm.data.sequence import SequenceBuilder
    from nextmm.precision import autocast, resolve
    from nextmm.train.stages import pretrain_objective, train_tokenizer

    cfg = make_config(preset)
    sources = discover_sources(data)
    tok = train_tokenizer(sources, cfg)
    model = build_model(cfg, tok)
    p = cfg.pretrain
    builder = SequenceBuilder.for_config(tok, cfg)
    stream = MixedStream(sources, p.mix, lambda s: builder.encode(s.segments), builder.collate, p.batch_size, 0, shuffle_buffer=0)
    batches = [stream.next_batch() for _ in range(steps + 3)]
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr)
    target, loss_fn, backward = pretrain_objective(model, p)

    def step(batch):
        with autocast(p.precision):
            out = loss_fn(batch)
        backward(out, 1.0)
        opt.step()
        opt.zero_grad()
        if target is not None:
            target.update(model)

    for batch in batches[:3]:
        step(batch)
    start = time.perf_counter()
    for batch in batches[3:]:
        step(batch)
    span = time.perf_counter() - start
    measured = batches[3:]
    return {
        "preset": preset,
        "parameters_m": round(sum(x.numel() for x in model.parameters()) / 1e6, 2),
        "batch_size": p.batch_size,
        "precision": resolve(p.precision),
        "steps": steps,
        "step_s": round(span / steps, 3),
        "tokens_per_s": round(sum(int(b["valid"].sum()) for b in measured) / span, 1),
        "images_per_s": round(sum(int(b["pixels"].shape[0]) for b in measured) / span, 1),
        "samples_per_s": round(sum(int(b["input_ids"].shape[0]) for b in measured) / span, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["micro", "tiny", "small"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.data)))
        return
    from nextmm.data.make import write_shapes

    with tempfile.TemporaryDirectory() as tmp:
        write_shapes(tmp, COUNTS, seed=0, shard_size=1000)
        results = []
        for preset in args.presets:
            out = subprocess.run([sys.executable, __file__, "--one", preset, "--steps", str(args.steps), "--data", tmp],
                                 capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"benchmark": "pretrain_throughput", "results": results}, indent=2))


if __name__ == "__main__":
    main()

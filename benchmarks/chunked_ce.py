"""Peak memory and time of the text loss's forward and backward over the LM head, whole against chunked
(models/chunked_ce.py), at a large vocabulary. Each way runs in its own process, whose peak resident memory
is what the JSON reports.

    python benchmarks/chunked_ce.py [--vocab 128256 --width 1024 --rows 8192 --chunk 2048]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(vocab: int, width: int, rows: int, chunk: int) -> dict:
    import torch
    import torch.nn.functional as F

    from nextmm.models.chunked_ce import chunked_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(width, vocab, bias=False)
    hidden = torch.randn(rows, width, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss = chunked_cross_entropy(head, hidden, labels, chunk) if chunk else F.cross_entropy(head(hidden).float(), labels)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"chunk": chunk, "loss": round(float(loss), 5), "seconds": round(seconds, 2), "peak_gib": round(peak / 2**20, 2),
            "added_peak_gib": round((peak - before) / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.vocab, args.width, args.rows, args.one)))
        return
    runs = []
    for chunk in (0, args.chunk):
        out = subprocess.run([sys.executable, __file__, "--vocab", str(args.vocab), "--width", str(args.width), "--rows", str(args.rows),
                              "--one", str(chunk)], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout))
    logits_gib = args.rows * args.vocab * 4 / 2**30
    print(json.dumps({"benchmark": "chunked_cross_entropy", "vocab": args.vocab, "width": args.width, "rows": args.rows,
                      "fp32_logits_gib": round(logits_gib, 2), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()

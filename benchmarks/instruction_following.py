"""Instruction following on held-out Shapes World conversations, for one or more models (e.g. a demo's model before
and after `nextmm tune`): each turn asked with the reference history before it, scored per turn type (text exactly
right, boxes at IoU >= 0.5, drawings by the pixel judge). Prints one JSON line per model.

Usage: python benchmarks/instruction_following.py --model runs/demo/model --model runs/demo/tuned [--conversations 300]
"""

import argparse
import json
import time

import nextmm
from nextmm.worlds.shapes.conversations import evaluate_conversations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="a model directory; repeat to compare")
    parser.add_argument("--conversations", type=int, default=300)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    for path in args.model:
        m = nextmm.load(path, device=args.device)
        start = time.perf_counter()
        result = evaluate_conversations(m, args.conversations, max_new_tokens=args.max_new_tokens, examples=0)
        result.pop("examples", None)
        print(json.dumps({"benchmark": "instruction_following", "model": path, "seconds": round(time.perf_counter() - start, 1), **result}))


if __name__ == "__main__":
    main()

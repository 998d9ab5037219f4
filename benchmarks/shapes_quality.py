"""Held-out Shapes World quality of a trained model: caption exact match, VQA accuracy (overall and per
template), video QA, few-shot binding. Usage: python benchmarks/shapes_quality.py --model runs/demo/model
[--scenes 500 --videos 200]. Prints JSON (the same figures `nextmm demo` writes to metrics.json)."""

import argparse
import json
import time

import nextmm
from nextmm.eval.shapes import EVAL_SEED, evaluate


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="runs/demo/model")
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--binding", type=int, default=100)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    args = parser.parse_args()
    start = time.perf_counter()
    results = evaluate(nextmm.load(args.model), args.scenes, args.videos, args.binding, args.seed)
    results.pop("examples")
    print(json.dumps({"benchmark": "shapes_quality", "model": args.model, **results, "eval_s": round(time.perf_counter() - start, 1)}, indent=2))


if __name__ == "__main__":
    main()

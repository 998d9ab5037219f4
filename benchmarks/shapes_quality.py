"""Held-out Shapes World quality of a trained model: captions (exact match, BLEU-4, CIDEr), VQA accuracy
(overall and per template), video QA, few-shot binding, grounding, ITM, region captions, CLIP retrieval.
Usage: python benchmarks/shapes_quality.py --model runs/demo/model [--scenes 500 --videos 200]
[--fewshot 100]. Prints JSON (the figures `nextmm eval shapes` writes); --fewshot N adds few-shot
captions, VQA and binding at 0/2/4/8 shots, random against RICES, on N queries each."""

import argparse
import json
import time

import nextmm
from nextmm.eval.fewshot import evaluate_fewshot
from nextmm.worlds.shapes.evaluation import EVAL_SEED, evaluate


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="runs/demo/model")
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--binding", type=int, default=100)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--fewshot", type=int, default=0, help="queries per few-shot task (0: none)")
    args = parser.parse_args()
    start = time.perf_counter()
    m = nextmm.load(args.model)
    results = evaluate(m, args.scenes, args.videos, args.binding, args.seed)
    results.pop("examples")
    if args.fewshot:
        results["fewshot"] = evaluate_fewshot(m, args.fewshot, seed=args.seed)
    print(json.dumps({"benchmark": "shapes_quality", "model": args.model, **results, "eval_s": round(time.perf_counter() - start, 1)}, indent=2))


if __name__ == "__main__":
    main()

"""Drawing figures for a trained model (e.g. the demo's): text-to-image on held-out one- and two-object
Shapes World prompts scored by the pixel judge, reconstruction through the decoder, end-to-end drawing
speed at batch 1 and 8, and the decoder's training step times at its stages' batch size.

Usage: python benchmarks/text_to_image.py --model runs/demo/model [--prompts 200] [--guidance 3 --steps 25]
[--negative empty|null] [--seed 10007] [--candidates 2,4,8] [--sweep]. `--seed` picks another set of held-out prompts.
`--candidates` also scores drawing each prompt from K noises and keeping the one the model judges to fit
best (`draw(candidates=K)`), a line per K. `--sweep` also scores 50 prompts of each kind for guidance 1, 2,
3, 5 and both negatives. Prints JSON lines.
"""

import argparse
import json
import time

import torch

import nextmm
from nextmm.eval.images import evaluate_drawing, held_out_scenes
from nextmm.data.transforms import to_pixels
from nextmm.worlds.shapes.evaluation import EVAL_SEED


def drawing_speed(m, batch: int, repeats: int = 2) -> float:
    prompts = [c for c, _ in held_out_scenes(1, batch)]
    m.draw(prompts[:1])  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        m.draw(prompts)
    return round(batch * repeats / (time.perf_counter() - start), 3)


def step_times(m, batch: int, repeats: int = 3) -> dict:
    """Forward + backward of each stage-2 loss, as its training step computes it (optimizer excluded)."""
    images = [img for _, img in held_out_scenes(1, batch)]
    pixels = to_pixels(images, m.config.decoder.image_size)
    with torch.no_grad():
        condition = m.model.encode_images(to_pixels(images, m.config.vision.image_size))
    out = {}
    for name, loss in (("autoencoder", lambda: m.decoder.autoencoder_loss(pixels)),
                       ("diffusion", lambda: m.decoder.diffusion_loss(pixels, condition))):
        loss()["loss"].backward()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            loss()["loss"].backward()
        out[f"{name}_step_s"] = round((time.perf_counter() - start) / repeats, 4)
    m.decoder.zero_grad(set_to_none=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--negative", help="null or empty; default: the model's decoder.negative")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="the held-out scenes' seed (default: the eval's)")
    parser.add_argument("--candidates", default="", help="comma-separated K: also score the best of K drawings per prompt")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    m = nextmm.load(args.model)
    options = {"guidance": args.guidance, "steps": args.steps, "negative": args.negative}
    scores = evaluate_drawing(m, one=args.prompts, two=args.prompts, reconstruct=100, seed=args.seed, **options)
    scores.pop("examples")
    print(json.dumps({"model": args.model, **options, "seed": args.seed, **scores, "threads": torch.get_num_threads()}))
    print(json.dumps({"images_per_s_batch1": drawing_speed(m, 1), "images_per_s_batch8": drawing_speed(m, 8),
                      **step_times(m, m.config.diffusion.batch_size)}))
    for k in (int(c) for c in args.candidates.split(",") if c):
        start = time.perf_counter()
        s = evaluate_drawing(m, one=args.prompts, two=args.prompts, reconstruct=0, seed=args.seed, candidates=k, **options)
        print(json.dumps({"candidates": k, "seconds": round(time.perf_counter() - start, 1),
                          **{key: v for key, v in s.items() if key.startswith("t2i_") and "obj_" in key}}))
    if args.sweep:
        for negative in ("empty", "null"):
            for guidance in (1.0, 2.0, 3.0, 5.0):
                s = evaluate_drawing(m, one=50, two=50, reconstruct=0, guidance=guidance, negative=negative, steps=args.steps)
                print(json.dumps({"negative": negative, "guidance": guidance,
                                  **{k: v for k, v in s.items() if k.endswith("all_objects_right")}}))


if __name__ == "__main__":
    main()

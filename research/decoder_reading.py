"""How well stage 2's visual decoder reads its condition, for a trained model and given decoder settings.

Trains the decoder afresh with stage 2's own functions (autoencoder, then diffusion; the model's config
and budgets unless overridden with --set) on a Shapes World data directory, then measures on held-out
scenes (seed 10007):
- vae_round_trip_{1,2}obj: the pixel judge on decode(encode(image)) of one- and two-object scenes, the
  autoencoder's ceiling (alone, with `--autoencoder-only`: the UNet is neither trained nor scored);
- denoise_mse_{own,other,null}: the UNet's loss with each image's own embeddings, another image's and the
  null condition, at the same noise and timesteps (all, and the noisier half: t >= 500). The gap between
  own and other is how much the condition tells the UNet;
- reconstruction and text-to-image, as `nextmm demo` scores them (eval/images.py), text-to-image against
  the config's `decoder.negative`.
The UNet trains on the LLM's regressions from captions for a share `decoder.regressed_condition` of its
images (`--set decoder.regressed_condition=0` is Emu's rule); the denoising losses use real embeddings.

Usage: python research/decoder_reading.py --model runs/demo/model --data runs/demo/data --out /tmp/dr
       [--set decoder.snr_gamma=5 ...] [--vae-from /tmp/dr-earlier] [--prompts 50] [--scenes 100]
       [--autoencoder-only]
`--vae-from` reuses the autoencoder an earlier run of this script trained, to compare UNet settings alone.
Prints one JSON line; the trained decoder is saved to OUT/decoder.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import nextmm
from nextmm.config import apply_overrides
from nextmm.data.loader import discover_sources
from nextmm.data.transforms import to_pixels
from nextmm.eval.images import evaluate_drawing, held_out_scenes
from nextmm.api import to_pil
from nextmm.train.decoder_stage import autoencoder_stage, build_decoder, diffusion_stage
from nextmm.worlds.shapes.judge import objects_in_caption, score_prompt


@torch.no_grad()
def vae_round_trip(decoder, scenes: int = 50) -> dict[str, float]:
    out = {}
    for count in (1, 2):
        pairs = held_out_scenes(count, scenes)
        rebuilt = to_pil(decoder.decode(decoder.encode(to_pixels([img for _, img in pairs], decoder.image_size))))
        right = [score_prompt(img, objects_in_caption(c))["all_objects_right"] for img, (c, _) in zip(rebuilt, pairs)]
        out[f"vae_round_trip_{count}obj"] = float(np.mean(right))
    return out


@torch.no_grad()
def denoising_losses(m, decoder, pairs, seed: int = 0) -> dict[str, float]:
    images = [img for _, img in pairs]
    latents = decoder.encode(to_pixels(images, decoder.image_size)).float()
    own = m.model.encode_images(to_pixels(images, m.config.vision.image_size)).float()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    b, steps = len(images), decoder.scheduler.config.num_train_timesteps
    t = (torch.arange(b) * steps // b).long()  # spread evenly over the schedule
    noisy = decoder.scheduler.add_noise(latents, noise, t)
    target = decoder.denoising_target(latents, noise, t)
    contexts = {"own": decoder._context(own, seen=True), "other": decoder._context(own.roll(1, 0), seen=True),
                "null": decoder._null_context().expand(b, -1, -1)}
    out = {}
    for name, context in contexts.items():
        error = (decoder._denoise(noisy, t, context) - target).pow(2).mean((1, 2, 3))
        out[f"denoise_mse_{name}"] = round(float(error.mean()), 5)
        out[f"denoise_mse_{name}_noisy"] = round(float(error[t >= steps // 2].mean()), 5)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="a trained model directory: its stage-1 model gives the condition")
    parser.add_argument("--data", required=True, help="the Shapes World shards stage 2 trains on")
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--vae-from", default="")
    parser.add_argument("--prompts", type=int, default=50, help="text-to-image prompts of each kind (one-, two-object)")
    parser.add_argument("--scenes", type=int, default=100, help="held-out scenes to reconstruct")
    parser.add_argument("--autoencoder-only", action="store_true", help="train and score the autoencoder alone")
    args = parser.parse_args()

    m = nextmm.load(args.model)
    cfg = apply_overrides(m.config, args.overrides)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if args.vae_from:
        shutil.copytree(Path(args.vae_from) / "autoencoder", out / "autoencoder")
    sources = discover_sources(args.data)
    decoder = build_decoder(cfg)
    start = time.perf_counter()
    autoencoder_stage(cfg, sources, out, decoder, resume=bool(args.vae_from))
    if args.autoencoder_only:
        steps = json.loads((out / "autoencoder" / "done.json").read_text())["step"]
        print(json.dumps({"overrides": args.overrides, "train_s": round(time.perf_counter() - start, 1),
                          "autoencoder_steps": steps, **vae_round_trip(decoder)}))
        return
    diffusion_stage(cfg, sources, out, decoder, m.model, m.require_clip(), m.tokenizer, resume=False)
    train_s = time.perf_counter() - start
    decoder.save(out / "decoder")
    m.decoder = decoder.eval()

    pairs = held_out_scenes(1, 50) + held_out_scenes(2, 50)
    steps = json.loads((out / "diffusion" / "done.json").read_text())["step"]
    scores = evaluate_drawing(m, one=args.prompts, two=args.prompts, reconstruct=args.scenes)
    scores.pop("examples")
    print(json.dumps({
        "overrides": args.overrides, "vae_from": args.vae_from, "train_s": round(train_s, 1),
        "diffusion_steps": steps, **vae_round_trip(decoder),
        **denoising_losses(m, decoder, pairs[:64]), **scores,
    }))


if __name__ == "__main__":
    main()

"""Where motion direction is lost: first, does the visual stack hold it (held-out accuracy of a linear
probe for the direction on the visual embeddings of a clip's first and last frames)? Then, does the LLM
learn to answer it: the model trained further on video QA alone, direction / mover colour / mover shape
scored on 100 held-out clips before and after every third of the steps.
Usage: python research/video_direction.py --model runs/demo/model --data runs/demo/data
[--steps 300] [--frames 2]. `--frames` sets vision.video_frames for the continuation and its scoring.
Prints JSON lines."""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import nextmm
from nextmm.data.loader import MixedStream, discover_sources
from nextmm.data.sample import Video
from nextmm.data.sequence import SequenceBuilder
from nextmm.data.transforms import to_pixels
from nextmm.train.loop import Trainer, param_groups
from nextmm.train.stages import pretrain_objective
from nextmm.worlds.shapes import generator as shapes
from nextmm.worlds.shapes.evaluation import EVAL_SEED, evaluate_video
from stage1_reading import probe_accuracy

DIRECTIONS = ["left", "right", "up", "down"]


def direction_probe(m: nextmm.NextMM, clips: int = 1000) -> float:
    samples = list(shapes.make_samples("video_caption", 5, clips))
    features = []
    with torch.no_grad():
        for sample in samples:
            frames = next(seg for seg in sample.segments if isinstance(seg, Video)).frames
            visual = m.model.encode_images(to_pixels([frames[0], frames[-1]], m.config.vision.image_size))
            features.append(visual.flatten())
    labels = torch.tensor([DIRECTIONS.index(s.meta["direction"]) for s in samples])
    return probe_accuracy(torch.stack(features), labels, int(0.8 * clips))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="runs/demo/model")
    parser.add_argument("--data", default="runs/demo/data")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--frames", type=int, default=0, help="vision.video_frames (0: the model's own)")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    m = nextmm.load(args.model)
    head = {"benchmark": "video_direction", "model": args.model, "frames": args.frames or m.config.vision.video_frames}
    print(json.dumps({**head, "first_last_probe": direction_probe(m)}), flush=True)
    if args.frames:
        m.config.vision.video_frames = m.builder.video_frames = args.frames
    cfg, model = m.config, m.model
    p = cfg.pretrain
    p.lr, p.steps, p.time_budget_s, p.warmup_steps, p.ckpt_every, p.min_lr_ratio = args.lr, args.steps, 0, 10, 0, 1.0
    builder = SequenceBuilder.for_config(m.tokenizer, cfg)
    sources = {k: v for k, v in discover_sources(args.data).items() if k == "video_qa"}
    stream = MixedStream(sources, {}, lambda s: builder.encode(s.segments), builder.collate, p.batch_size, 0)
    _, loss_fn, backward = pretrain_objective(model, p)
    clock = {"step": 0, "train_s": 0.0, "since": time.perf_counter()}

    def score() -> None:
        clock["train_s"] += time.perf_counter() - clock["since"]
        result, _ = evaluate_video(m, 100, EVAL_SEED)
        model.train()  # NextMM puts the model in eval mode
        print(json.dumps({**head, "step": clock["step"], "train_s": round(clock["train_s"], 1), **result["video_qa_per_template"]}), flush=True)
        clock["since"] = time.perf_counter()

    def after_step() -> None:
        clock["step"] += 1
        if clock["step"] % max(args.steps // 3, 1) == 0:
            score()

    score()
    with tempfile.TemporaryDirectory() as tmp:
        Trainer("video", model, loss_fn, p, Path(tmp),
                groups=param_groups(model, p.lr, p.weight_decay, {"vision.": p.vision_lr_scale}),
                backward=backward, after_step=after_step).run(stream)


if __name__ == "__main__":
    main()

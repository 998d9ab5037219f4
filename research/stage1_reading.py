"""How fast stage 1 learns to read its images: caption-only stage-1 training from a stage-0 tower, with
the colour, shape and size words of held-out one-object captions scored along the way (chance 1/8, 1/4,
1/2) and whole-caption exact match on held-out 1-3-object scenes. First, what the stage-0 tower holds:
held-out accuracy of linear probes for shape and colour on its max-pooled features of one-object scenes.
Usage: python research/stage1_reading.py [--steps 400] [--clip-seconds 100] [--set resampler.seed=none ...]
Makes its own Shapes World captions and stage-0 tower in a temporary folder. Prints JSON lines."""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nextmm.api import NextMM, build_model
from nextmm.config import make_config
from nextmm.data.loader import MixedStream, discover_sources
from nextmm.data.make import write_shapes
from nextmm.data.sequence import SequenceBuilder
from nextmm.data.transforms import to_pixels
from nextmm.train.loop import Trainer, param_groups
from nextmm.train.stages import clip_stage, pretrain_objective, train_tokenizer
from nextmm.worlds.shapes import generator as shapes


def word_accuracy(m: NextMM, scenes: list) -> dict[str, float]:
    """'a {size} {colour} {shape}': score words 2-4 of each one-object caption."""
    words = [c.split() + ["?"] * 4 for c in m.caption([s.image() for s in scenes])]
    truth = [s.objects[0] for s in scenes]
    return {
        name: round(float(np.mean([w[i] == getattr(o, name) for w, o in zip(words, truth)])), 3)
        for i, name in ((1, "size"), (2, "colour"), (3, "shape"))
    }


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, train: int) -> float:
    """Held-out accuracy of an L2-regularised linear classifier fitted with L-BFGS on standardised features."""
    mean, std = features[:train].mean(0), features[:train].std(0) + 1e-5
    x = (features - mean) / std
    weights = torch.zeros(x.shape[1], int(labels.max()) + 1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:train] @ weights, labels[:train]) + 1e-3 * weights.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return round(((x[train:] @ weights).argmax(1) == labels[train:]).float().mean().item(), 3)


def tower_probes(tower: torch.nn.Module) -> dict[str, float]:
    scenes = [shapes.sample_scene(np.random.default_rng([9, i]), n_objects=1) for i in range(1200)]
    with torch.no_grad():
        features = tower(to_pixels([s.image() for s in scenes], 64)).amax(1)
    objects = [s.objects[0] for s in scenes]
    return {
        "shape_probe": probe_accuracy(features, torch.tensor([shapes.SHAPES.index(o.shape) for o in objects]), 1000),
        "colour_probe": probe_accuracy(features, torch.tensor([list(shapes.COLOURS).index(o.colour) for o in objects]), 1000),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--clip-seconds", type=float, default=100)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = make_config("tiny", overrides=[f"clip.time_budget_s={args.clip_seconds}", *args.set])
    ones = [shapes.sample_scene(np.random.default_rng([77, i]), n_objects=1) for i in range(100)]
    scenes = [shapes.sample_scene(np.random.default_rng([78, i])) for i in range(150)]
    with tempfile.TemporaryDirectory() as tmp:
        write_shapes(tmp, {"caption": 6000}, seed=0, shard_size=2000)
        sources = discover_sources(tmp)
        tok = train_tokenizer(sources, cfg)
        cfg.llm.vocab_size = tok.vocab_size
        clip = clip_stage(cfg, sources, Path(tmp) / "run", tok, resume=False)
        print(json.dumps({"benchmark": "stage1_reading", "overrides": args.set, "stage": 0, **tower_probes(clip.visual)}), flush=True)
        torch.manual_seed(1)
        model = build_model(cfg, tok)
        model.vision.load_state_dict(clip.visual.state_dict())
        p = cfg.pretrain
        p.steps, p.time_budget_s, p.ckpt_every = args.steps, 0, 0
        builder = SequenceBuilder.for_config(tok, cfg)
        stream = MixedStream(sources, {}, lambda s: builder.encode(s.segments), builder.collate, p.batch_size, 0)
        _, loss_fn, backward = pretrain_objective(model, p)
        progress = {"step": 0, "eval_s": 0.0, "start": time.perf_counter()}

        def score() -> None:
            progress["step"] += 1
            if progress["step"] % max(args.steps // 4, 1):
                return
            start = time.perf_counter()
            m = NextMM(model, tok, cfg)
            exact = np.mean([c == s.caption() for c, s in zip(m.caption([s.image() for s in scenes]), scenes)])
            record = {**word_accuracy(m, ones), "caption_exact_match": round(float(exact), 3)}
            model.train()  # NextMM puts the model in eval mode
            progress["eval_s"] += time.perf_counter() - start
            train_s = time.perf_counter() - progress["start"] - progress["eval_s"]
            print(json.dumps({"benchmark": "stage1_reading", "overrides": args.set, "step": progress["step"],
                              "train_s": round(train_s, 1), **record}), flush=True)

        # The stage-1 trainer itself (schedule, precision, clipping), with scoring after every quarter.
        Trainer("pretrain", model, loss_fn, p, Path(tmp) / "pretrain",
                groups=param_groups(model, p.lr, p.weight_decay, {"vision.": p.vision_lr_scale}),
                backward=backward, after_step=score).run(stream)


if __name__ == "__main__":
    main()

"""How fast stage 1 learns to read its images: caption-only stage-1 training from a stage-0 tower, with
the colour, shape and size words of held-out one-object captions scored along the way (chance 1/8, 1/4,
1/2) and whole-caption exact match on held-out 1-3-object scenes.
Usage: python benchmarks/stage1_reading.py [--steps 320] [--clip-seconds 60] [--set pretrain.regression_weight=1.0 ...]
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
from nextmm.data import shapes
from nextmm.data.loader import MixedStream, discover_sources
from nextmm.data.make import write_shapes
from nextmm.data.sequence import SequenceBuilder
from nextmm.train.loop import Trainer, param_groups
from nextmm.train.stages import clip_stage, pretrain_objective, train_tokenizer


def word_accuracy(m: NextMM, scenes: list) -> dict[str, float]:
    """'a {size} {colour} {shape}': score words 2-4 of each one-object caption."""
    words = [c.split() + ["?"] * 4 for c in m.caption([s.image() for s in scenes])]
    truth = [s.objects[0] for s in scenes]
    return {
        name: round(float(np.mean([w[i] == getattr(o, name) for w, o in zip(words, truth)])), 3)
        for i, name in ((1, "size"), (2, "colour"), (3, "shape"))
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=320)
    parser.add_argument("--clip-seconds", type=float, default=60)
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
        torch.manual_seed(1)
        model = build_model(cfg, tok)
        model.vision.load_state_dict(clip.visual.state_dict())
        p = cfg.pretrain
        p.steps, p.time_budget_s, p.ckpt_every = args.steps, 0, 0
        builder = SequenceBuilder(tok, cfg.resampler.num_queries, cfg.vision.image_size, cfg.llm.max_seq_len)
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

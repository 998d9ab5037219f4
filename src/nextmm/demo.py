"""`nextmm demo`: the whole pipeline on Shapes World — data, stage 0, stage 1, stage 2 (the visual
decoder), held-out evaluation of reading and drawing, instruction tuning on conversations with instruction
following scored before and after it, and a report — within the stages' time budgets (about fifteen minutes
on 2 CPU cores for the `tiny` preset)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from nextmm import api
from nextmm.config import make_config
from nextmm.data.make import write_shapes
from nextmm.eval.images import evaluate_drawing
from nextmm.report import write_report
from nextmm.train.stages import train
from nextmm.train.tune import tune
from nextmm.worlds.shapes.conversations import evaluate_conversations
from nextmm.worlds.shapes.evaluation import evaluate

EVAL_SIZES = {"micro": (40, 16, 16)}  # scenes, videos, binding prompts; others use the full sizes
# 400 scenes, not 500, so the held-out eval leaves the demo a margin within 15 minutes;
# benchmarks/shapes_quality.py scores 500.
FULL_EVAL = (400, 200, 100)
DRAW_SIZES = {"micro": (4, 4, 4)}  # one-object prompts, two-object prompts, reconstructions
# A quick look within the demo's 15 minutes (benchmarks/text_to_image.py scores 200 + 200): at about 4 images
# a second, 100 rather than 160 leave a margin.
FULL_DRAW = (40, 40, 20)
CHAT_SIZES = {"micro": (32, 8)}  # conversations tuned on, held-out conversations scored before and after tuning
# The tiny preset's 45 s of tuning sees about 1000 conversations at batch 16: 1200 written, few repeat.
FULL_CHAT = (1200, 100)


def run_demo(out_dir: str | Path = "runs/demo", preset: str = "tiny", overrides: list[str] = (), resume: bool = False,
             device: str = "auto") -> dict[str, Any]:
    start = time.perf_counter()
    cfg = make_config(preset, overrides=list(overrides))
    out = Path(out_dir)
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}

    data_dir = out / "data"
    if not (resume and (data_dir / "done.json").is_file()):
        print(f"[data] writing Shapes World shards to {data_dir}")
        counts = write_shapes(data_dir, cfg.data.counts, cfg.data.seed, cfg.data.shard_size, overwrite=True)
        (data_dir / "done.json").write_text(json.dumps(counts))
    timings["data_s"] = time.perf_counter() - start

    t = time.perf_counter()
    paths = train(cfg, data_dir, out, resume=resume, device=device)
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    print("[eval] scoring held-out Shapes World")
    model = api.load(paths["model"], device=device)
    scenes, videos, binding = EVAL_SIZES.get(cfg.preset, FULL_EVAL)
    results = evaluate(model, scenes=scenes, videos=videos, binding=binding)
    examples = results.pop("examples")
    if model.decoder is not None:
        print("[eval] drawing held-out prompts")
        one, two, rebuilt = DRAW_SIZES.get(cfg.preset, FULL_DRAW)
        drawing = evaluate_drawing(model, one=one, two=two, reconstruct=rebuilt)
        examples["drawings"] = drawing.pop("examples")
        results.update(drawing)
    timings["eval_s"] = time.perf_counter() - t
    results.update(instruction_tuning(cfg, model, Path(paths["model"]), out, resume, device, timings))
    timings["total_s"] = time.perf_counter() - start
    metrics = {**results, "preset": cfg.preset, **{k: round(v, 1) for k, v in timings.items()}}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    report = write_report(out / "report.html", metrics, examples, out)
    return {"model": paths["model"], "metrics": str(out / "metrics.json"), "report": str(report), **metrics}


def instruction_tuning(cfg, model: api.NextMM, model_dir: Path, out: Path, resume: bool, device: str, timings: dict[str, float]) -> dict[str, Any]:
    """Tune the trained model (its config's tune section, where the demo's --set tune.* already went) on Shapes World
    conversations written apart from stage 1's data, into out/tuned; instruction following on held-out conversations
    before and after, per turn type (worlds/shapes/conversations.py)."""
    tuned_on, scored = CHAT_SIZES.get(cfg.preset, FULL_CHAT)
    t = time.perf_counter()
    chats = out / "conversations"
    if not (resume and (chats / "done.json").is_file()):
        print(f"[tune] writing Shapes World conversations to {chats}")
        counts = write_shapes(chats, {"conversation": tuned_on}, cfg.data.seed, cfg.data.shard_size, overwrite=True)
        (chats / "done.json").write_text(json.dumps(counts))
    print("[eval] instruction following before tuning")
    before = evaluate_conversations(model, scored)
    tuned = tune(model_dir, chats, out / "tuned", resume=resume, device=device)
    print(f"[tune] tuned model written to {tuned['model']}")
    print("[eval] instruction following after tuning")
    after = evaluate_conversations(api.load(tuned["model"], device=device), scored)
    timings["tune_s"] = time.perf_counter() - t
    return {"chat_before_accuracy": before["overall"], "chat_after_accuracy": after["overall"],
            "chat_before_per_turn": before["turns"], "chat_after_per_turn": after["turns"], "tuned_model": tuned["model"]}

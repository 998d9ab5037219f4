"""What the demo's stage 1 learns of grounding, and what it costs reading: stage 1 trained again from a
finished demo run's stage 0 (its tokenizer and CLIP tower, so every variant starts from the same tower),
within the demo's stage-1 budget, with any config overrides; no visual decoder. Then held-out Shapes World
(200 scenes, 40 videos, 40 binding prompts): grounding Acc@0.5 and centre miss, detection, captions, VQA,
binding. Also when the LLM learned to read its pictures: the logged caption cross-entropy at step 100 and over
the last 20 steps before the other sources join (caption batches alone until then). Joining at 200, 0.51 or less
there went with caption exact match 0.375 or more at the end, 0.67 or more with 0.275 or less (19 runs,
BENCHMARKS.md, session 22).

Usage: python research/stage1_grounding.py --run runs/demo --out runs/s1 [--set llm.pointer_roles=false ...]
       [--stop-after 200]  (the first N steps of the configured schedule, reading onset only, no evaluation)
Prints one JSON object (and writes it to OUT/grounding.json)."""

import argparse
import json
import multiprocessing
import shutil
import time
from pathlib import Path

import nextmm
from nextmm.config import make_config
from nextmm.train.stages import train
from nextmm.worlds.shapes.evaluation import evaluate

KEPT = ("caption_exact_match", "vqa_accuracy", "grounding_acc_at_0.5", "grounding_centre_miss_px", "detection_f1",
        "itm_accuracy", "itm_calibrated_accuracy", "region_caption_exact_match", "video_direction_accuracy", "binding_2shot_choice_accuracy",
        "binding_4shot_accuracy", "binding_4shot_choice_accuracy", "binding_4shot_chance")


def reading_onset(metrics: Path, joined: int) -> dict:
    """Caption cross-entropy as logged at step 100 (when no source joined before) and over the last 20 steps
    before the first source joins at step `joined`."""
    ce = {row["step"]: row["ce"] for row in map(json.loads, metrics.read_text().splitlines()) if "step" in row}
    late = [ce[s] for s in (joined - 20, joined - 10, joined) if s in ce]
    return {"caption_ce_at_100": ce.get(100) if joined >= 100 else None, "others_join_at": joined,
            "caption_ce_before_join": round(sum(late) / len(late), 4) if late else None}


def train_until(cfg, data: Path, out: Path, steps: int) -> None:
    """Stage 1 in a child process, stopped once step `steps` is logged: the start of the configured schedule."""
    child = multiprocessing.Process(target=train, args=(cfg, data, out), kwargs={"resume": True})
    child.start()
    metrics = out / "pretrain" / "metrics.jsonl"
    while child.is_alive():
        if metrics.is_file() and any(json.loads(line).get("step", 0) >= steps for line in metrics.read_text().splitlines()):
            child.terminate()
            break
        time.sleep(2)
    child.join()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True, help="a finished `nextmm demo` folder (its data/, clip/ and tokenizer.json)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--stop-after", type=int, default=0, help="stop after this many steps, unevaluated")
    args = parser.parse_args()
    run, out = Path(args.run), Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; give a new --out folder")
    out.mkdir(parents=True)
    shutil.copytree(run / "clip", out / "clip")
    shutil.copy(run / "tokenizer.json", out / "tokenizer.json")
    cfg = make_config("tiny", overrides=[*args.set, "diffusion.steps=0"])
    joined = min((at for source, at in cfg.pretrain.join_at.items() if cfg.pretrain.mix.get(source, 0) > 0), default=0)
    if args.stop_after:
        train_until(cfg, run / "data", out, args.stop_after)
        report = {"overrides": args.set, **reading_onset(out / "pretrain" / "metrics.jsonl", joined)}
    else:
        paths = train(cfg, run / "data", out, resume=True)
        done = json.loads((out / "pretrain" / "done.json").read_text())
        results = evaluate(nextmm.load(paths["model"]), scenes=200, videos=40, binding=40)
        report = {"overrides": args.set, "stage1_steps": done["step"], **reading_onset(out / "pretrain" / "metrics.jsonl", joined), **{k: results[k] for k in KEPT}}
    (out / "grounding.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()

"""What the demo's stage 1 learns of grounding, and what it costs reading: stage 1 trained again from a
finished demo run's stage 0 (its tokenizer and CLIP tower, so every variant starts from the same tower),
within the demo's stage-1 budget, with any config overrides; no visual decoder. Then held-out Shapes World
(200 scenes, 40 videos, 40 binding prompts): grounding Acc@0.5 and centre miss, detection, captions, VQA,
binding.

Usage: python benchmarks/stage1_grounding.py --run runs/demo --out runs/s1 [--set llm.pointer_roles=false ...]
Prints one JSON object (and writes it to OUT/grounding.json)."""

import argparse
import json
import shutil
from pathlib import Path

import nextmm
from nextmm.config import make_config
from nextmm.eval.shapes import evaluate
from nextmm.train.stages import train

KEPT = ("caption_exact_match", "vqa_accuracy", "grounding_acc_at_0.5", "grounding_centre_miss_px", "detection_f1",
        "itm_accuracy", "region_caption_exact_match", "video_direction_accuracy", "binding_2shot_choice_accuracy",
        "binding_4shot_accuracy", "binding_4shot_choice_accuracy", "binding_4shot_chance")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True, help="a finished `nextmm demo` folder (its data/, clip/ and tokenizer.json)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    run, out = Path(args.run), Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; give a new --out folder")
    out.mkdir(parents=True)
    shutil.copytree(run / "clip", out / "clip")
    shutil.copy(run / "tokenizer.json", out / "tokenizer.json")
    cfg = make_config("tiny", overrides=[*args.set, "diffusion.steps=0"])
    paths = train(cfg, run / "data", out, resume=True)
    done = json.loads((out / "pretrain" / "done.json").read_text())
    results = evaluate(nextmm.load(paths["model"]), scenes=200, videos=40, binding=40)
    report = {"overrides": args.set, "stage1_steps": done["step"], **{k: results[k] for k in KEPT}}
    (out / "grounding.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()

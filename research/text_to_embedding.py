"""How fast a trained stage-1 model learns a new output when it trains on it, and what that costs its
reading: continues training the language side (or the regression head alone, or the whole model) on a
chosen mix of Shapes World sources (the text-to-image view among them) and scores along the way the LLM's side of
text-to-image (eval/images.regression_retrieval), grounding (Acc@0.5 on held-out expressions),
binding (4-shot accuracy) or image-text matching (accuracy), then captions and VQA at the end.

Usage: python research/text_to_embedding.py --model runs/demo/model --data runs/demo/data
       [--mix '{"text_to_image": 1}'] [--lr 1e-3] [--steps 160] [--every 20] [--train all|head|everything]
       [--score retrieval|grounding|binding|itm] [--location-sigma S] [--location-head] [--location-pointer]
       [--pointer-weight W] [--pointer-lr X] [--seed S] [--anneal] [--save DIR]
Prints JSON lines: one per scoring, then a summary with reading before and after.
"""

import argparse
import json
import time
from itertools import islice

import numpy as np
import torch

import nextmm
from nextmm.data.loader import MixedStream, discover_sources
from nextmm.data.sequence import SequenceBuilder
from nextmm.eval.images import regression_retrieval
from nextmm.eval.metrics import box_misses, grounding_accuracy
from nextmm.heads.location import location_head_for, location_token_loss
from nextmm.train import regression
from nextmm.train.loop import lr_factor, param_groups
from nextmm.train.stages import text_to_image_view
from nextmm.worlds.shapes import generator as shapes
from nextmm.worlds.shapes.evaluation import EVAL_SEED, evaluate_binding, evaluate_captions, evaluate_vqa, matching_answers


def grounding(m, n: int = 100) -> dict:
    """Acc@0.5, and the median pixel error of the boxes' centres and sides: where a miss misses."""
    samples = list(islice(shapes.make_samples("ground", EVAL_SEED, n), n))
    boxes = m.ground([s.segments[0].image for s in samples], [s.meta["phrase"] for s in samples])
    truth = [s.meta["box"] for s in samples]
    centre, side = zip(*(box_misses(b, t) for b, t in zip(boxes, truth)))
    return {"acc_at_0.5": grounding_accuracy(boxes, truth), "centre_error_px": float(np.median(centre)), "side_error_px": float(np.median(side))}


def binding(m, n: int = 100) -> dict:
    return evaluate_binding(m, n, EVAL_SEED, shots=4)


def matching(m, n: int = 200) -> dict:
    """Image-text matching accuracy on held-out samples (half the texts describe the image), and how often
    the model said yes: a model that has not learned it says one answer to all."""
    said, _, truth = matching_answers(m, n, EVAL_SEED)
    return {"itm_accuracy": float((said == truth).mean()), "said_yes": float(said.mean())}


SCORES = {"retrieval": regression_retrieval, "grounding": grounding, "binding": binding, "itm": matching}


def reading(m) -> dict:
    captions, _ = evaluate_captions(m, 200, EVAL_SEED)
    vqa, _ = evaluate_vqa(m, 100, EVAL_SEED)
    return {"caption_exact_match": captions["caption_exact_match"], "vqa_accuracy": vqa["vqa_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--mix", default='{"text_to_image": 1}', help="JSON mix weights; sources not named get 0")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--train", choices=("all", "head", "everything"), default="all",
                        help="all: the language side; head: the regression head alone; everything: the visual stack too, as stage 1 trains it")
    parser.add_argument("--score", choices=tuple(SCORES), default="retrieval")
    parser.add_argument("--location-sigma", type=float, help="soft location targets (pretrain.location_sigma); default: the model's config")
    parser.add_argument("--location-head", action="store_true", help="give a model saved without one a new LocationHead (heads.location)")
    parser.add_argument("--location-pointer", action="store_true", help="give the model's location head a new PatchPointer (heads.pointer), and a new head if it has none")
    parser.add_argument("--pointer-weight", type=float, help="supervise the pointer's attention with the boxes (pretrain.pointer_weight); default: the model's config")
    parser.add_argument("--pointer-lr", type=float, default=1.0, help="the location pointer's learning rate, as a multiple of --lr")
    parser.add_argument("--seed", type=int, default=0, help="the batches' order; give a continued model a new one")
    parser.add_argument("--anneal", action="store_true", help="as the training stages do: the lr falls by a cosine to a tenth, gradients clipped to norm 1")
    parser.add_argument("--save", help="write the continued model to this directory")
    args = parser.parse_args()
    score = SCORES[args.score]

    torch.manual_seed(args.seed)
    m = nextmm.load(args.model)
    model, cfg = m.model, m.config
    location = model.heads.location if "location" in model.heads else None
    has_pointer = location is not None and location.pointer is not None
    if (args.location_head and location is None) or (args.location_pointer and not has_pointer):
        # the parts asked for start fresh; a trained head keeps its weights
        cfg.heads.location, cfg.heads.pointer = True, args.location_pointer or has_pointer
        head = location_head_for(cfg, len(model.heads.location_ids))
        if location is not None:
            head.load_state_dict(location.state_dict(), strict=False)
        model.heads["location"] = head  # location's hooks run first, as heads_for orders them
    sources = discover_sources(args.data)
    views = text_to_image_view(sources)
    mix = json.loads(args.mix)
    sigma = cfg.pretrain.location_sigma if args.location_sigma is None else args.location_sigma
    pointer_weight = cfg.pretrain.pointer_weight if args.pointer_weight is None else args.pointer_weight
    builder = SequenceBuilder.for_config(m.tokenizer, cfg)
    stream = MixedStream(
        sources, {name: mix.get(name, 0.0) for name in [*sources, *views]},
        lambda s: builder.encode(s.segments), builder.collate, cfg.pretrain.batch_size, seed=args.seed, views=views,
    )
    if args.train == "everything":
        trained = param_groups(model, args.lr, 0.0, {"vision.": cfg.pretrain.vision_lr_scale})
    else:
        trained = regression.language_side(model) if args.train == "all" else list(model.regression_head.parameters())
    pointer = getattr(model.heads["location"] if "location" in model.heads else None, "pointer", None)
    if pointer is not None and args.pointer_lr != 1:
        in_pointer = {id(p) for p in pointer.parameters()}
        trained = [{"params": [p for p in trained if id(p) not in in_pointer]},
                   {"params": [p for p in trained if id(p) in in_pointer], "lr": args.lr * args.pointer_lr}]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    before = reading(m)
    print(json.dumps({"step": 0, args.score: score(m)}), flush=True)
    start, train_s = time.perf_counter(), 0.0
    for step in range(1, args.steps + 1):
        tick = time.perf_counter()
        model.train()
        batch = stream.next_batch()
        out = model.loss(batch["input_ids"], batch["labels"], batch["pixels"], cfg.pretrain.regression_weight,
                         text_loss=location_token_loss(model.heads.location_ids, sigma), head_weight=pointer_weight)
        model.zero_grad(set_to_none=True)
        regression.backward(model, out)
        if args.anneal:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * lr_factor((step - 1) / args.steps, 0.0, 0.1)
        optimizer.step()
        train_s += time.perf_counter() - tick
        if step % args.every == 0:
            model.eval()
            print(json.dumps({"step": step, "train_s": round(train_s, 1), "l2": round(float(out["l2"].detach()), 4),
                              **({"pointer": round(float(out["pointer"].detach()), 3)} if "pointer" in out else {}),
                              args.score: score(m)}), flush=True)
    model.eval()
    print(json.dumps({"mix": mix, "location_sigma": sigma, "pointer_weight": pointer_weight, "pointer_lr": args.pointer_lr, "anneal": args.anneal, "location_head": "location" in model.heads,
                      "location_pointer": pointer is not None, "lr": args.lr, "steps": args.steps, "train": args.train, "train_s": round(train_s, 1),
                      args.score: score(m), "before": before, "after": reading(m),
                      "wall_s": round(time.perf_counter() - start, 1)}), flush=True)
    if args.save:
        m.save(args.save)


if __name__ == "__main__":
    main()

"""Which judge best picks the right drawing among K drawn for one prompt (`draw(candidates=K)` uses the
matching margin).

Each held-out Shapes World prompt is drawn from K noises (seeds 0 .. K-1); the pixel judge says which came
out right. Printed per object count: `each`, the share right of single drawings; `any`, of prompts with at
least one right drawing (what a perfect judge would reach); and the share right of those picked by
- matching: the LLM's yes-minus-no margin for `does the text "..." match the image?` (`match_margins`);
- matching_calibrated: that margin less the one for an empty text on the same drawing;
- caption_logp: the log-likelihood of the prompt as the drawing's caption;
- clip: the CLIP stage's image-text similarity.

Usage: python research/drawing_judges.py --model M [--candidates 4] [--prompts 100]. Prints JSON lines.
"""

import argparse
import json
import time

import numpy as np
import torch

import nextmm
from nextmm.data.sample import Image
from nextmm.eval.images import held_out_scenes
from nextmm.generate import Stepper
from nextmm.worlds.shapes.judge import objects_in_caption, score_prompt


@torch.no_grad()
def caption_log_likelihood(m, images, texts) -> torch.Tensor:
    """(n,) log p(text | picture) as the picture's caption, teacher-forced through the KV cache."""
    scores = []
    for start in range(0, len(images), m.batch_size):
        pictures, ids = images[start : start + m.batch_size], [m.tokenizer.encode(t) for t in texts[start : start + m.batch_size]]
        longest = max(map(len, ids))
        batch = m.builder.collate([m.builder.encode([Image(p)], close=False) for p in pictures], left_pad=True)
        stepper = Stepper(m.model, batch, longest + 1, True, "fp32")
        hidden, total = stepper.prefill(), torch.zeros(len(pictures))
        for j in range(longest):
            token = torch.tensor([row[min(j, len(row) - 1)] for row in ids])
            in_text = torch.tensor([j < len(row) for row in ids], dtype=torch.float)
            total += torch.log_softmax(stepper.logits(hidden).float(), -1)[torch.arange(len(pictures)), token] * in_text
            hidden = stepper.append_token(token)
        scores.append(total)
    return torch.cat(scores)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=100, help="held-out prompts of each kind (one-, two-object)")
    args = parser.parse_args()
    m, k = nextmm.load(args.model), args.candidates
    for count in (1, 2):
        start = time.perf_counter()
        prompts = [c for c, _ in held_out_scenes(count, args.prompts)]
        drawn = [m.draw(prompts, seed=seed) for seed in range(k)]
        right = np.array([[score_prompt(img, objects_in_caption(c))["all_objects_right"] for img, c in zip(row, prompts)] for row in drawn])
        flat, texts = [img for row in drawn for img in row], prompts * k
        matching = m.match_margins(flat, texts)
        judges = {
            "matching": matching,
            "matching_calibrated": matching - m.match_margins(flat, [""] * len(flat)),
            "caption_logp": caption_log_likelihood(m, flat, texts),
            "clip": (m.clip_image_features(flat) * m.clip_text_features(texts)).sum(1),
        }
        picked = {name: float(right[s.view(k, -1).argmax(0).numpy(), np.arange(len(prompts))].mean()) for name, s in judges.items()}
        print(json.dumps({"objects": count, "candidates": k, "prompts": len(prompts), "each": float(right.mean()),
                          "any": float(right.max(0).mean()), **picked, "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()

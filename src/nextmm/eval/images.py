"""Score drawing on held-out Shapes World with the pixel judge (worlds/shapes/judge.py).

Text-to-image: the captions of held-out one- and two-object scenes as prompts; an image is right when
every object the prompt names was drawn with its colour and shape (sizes are reported apart).
Reconstruction (image -> the model's N embeddings -> decoder) scores the decoder alone: its ceiling for
what the LLM's regressed embeddings can give. Regression retrieval scores the LLM alone: whether the
embeddings it regresses for a one-object prompt lie nearest to those of a picture of that object.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np
import torch

from nextmm.api import NextMM
from nextmm.data.sample import Image, Text
from nextmm.worlds.shapes import generator as shapes
from nextmm.worlds.shapes.evaluation import EVAL_SEED
from nextmm.worlds.shapes.judge import objects_in_caption, score_prompt


def held_out_scenes(objects: int, n: int, seed: int = EVAL_SEED) -> list[tuple[str, Any]]:
    """(caption, image) of the first n held-out scenes with exactly `objects` objects."""
    found: list[tuple[str, Any]] = []
    for sample in shapes.make_samples("caption", seed, 50 * n):
        if len(found) == n:
            break
        caption = next(seg.text for seg in sample.segments if isinstance(seg, Text))
        if len(objects_in_caption(caption)) == objects:
            found.append((caption, next(seg.image for seg in sample.segments if isinstance(seg, Image))))
    if len(found) == n:
        return found
    raise ValueError(f"fewer than {n} held-out scenes with {objects} objects in {50 * n} tries")


def _scores(images: list, captions: list[str]) -> dict[str, float]:
    wanted = [objects_in_caption(c) for c in captions]
    scored = [score_prompt(img, objects) for img, objects in zip(images, wanted)]
    first_named = [objects[0] for objects in wanted]
    return {
        "all_objects_right": float(np.mean([s["all_objects_right"] for s in scored])),
        "size_right": float(np.mean([s["size_rate"] for s in scored])),
        # the first named object's colour (shape) drawn at all, whatever its shape (colour)
        "colour_right": float(np.mean([any(j[1] == w[1] for j in s["judged"]) for w, s in zip(first_named, scored)])),
        "shape_right": float(np.mean([any(j[2] == w[2] for j in s["judged"]) for w, s in zip(first_named, scored)])),
        "exact": float(np.mean([s["exact"] for s in scored])),
    }


def regression_retrieval(m: NextMM, prompts: int = 100, gallery: int = 400, seed: int = EVAL_SEED) -> float:
    """The share of held-out one-object prompts whose regressed embeddings (flattened, L2) lie nearest to
    the embeddings of a gallery picture of the prompt's colour and shape, among `gallery` held-out
    one-object pictures (other scenes than the prompts'): the LLM's side of text-to-image, whatever the
    decoder makes of it."""
    scenes = held_out_scenes(1, prompts + gallery, seed)
    asked, pictures = scenes[:prompts], scenes[prompts:]
    true = m.embed_images([img for _, img in pictures]).flatten(1)
    nearest = torch.cdist(m.regress([c for c, _ in asked]).flatten(1), true).argmin(1).tolist()
    colour_shape = lambda caption: objects_in_caption(caption)[0][1:]  # noqa: E731
    return float(np.mean([colour_shape(c) == colour_shape(pictures[i][0]) for (c, _), i in zip(asked, nearest)]))


def evaluate_drawing(
    m: NextMM, one: int = 200, two: int = 200, reconstruct: int = 100, seed: int = EVAL_SEED, **draw_options
) -> dict[str, Any]:
    """Text-to-image on `one` one-object and `two` two-object held-out prompts, and reconstruction of
    `reconstruct` held-out scenes; "examples" holds (prompt, image) pairs for the report."""
    results: dict[str, Any] = {}
    examples = []
    start = time.perf_counter()
    for count, n in ((1, one), (2, two)):
        captions = [c for c, _ in held_out_scenes(count, n, seed)]
        images = m.draw(captions, **draw_options)
        for key, value in _scores(images, captions).items():
            results[f"t2i_{count}obj_{key}"] = round(value, 4)
        examples += list(itertools.islice(zip(captions, images), 8))
    results["t2i_images_per_s"] = round((one + two) / (time.perf_counter() - start), 2)
    results["t2i_regression_retrieval"] = round(regression_retrieval(m, prompts=one, seed=seed), 4)
    if reconstruct:
        pairs = held_out_scenes(1, reconstruct // 2, seed) + held_out_scenes(2, reconstruct - reconstruct // 2, seed)
        rebuilt = m.reconstruct([img for _, img in pairs], **{k: v for k, v in draw_options.items() if k in ("guidance", "steps")})
        results["reconstruction_all_objects_right"] = round(_scores(rebuilt, [c for c, _ in pairs])["all_objects_right"], 4)
        examples += [(f"reconstruction of: {c}", img) for (c, _), img in itertools.islice(zip(pairs, rebuilt), 4)]
    return {**results, "t2i_prompts": {"one_object": one, "two_objects": two}, "examples": examples}

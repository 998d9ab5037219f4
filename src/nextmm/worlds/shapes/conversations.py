"""Held-out instruction following: Shapes World conversations (shared/shapes-world.md, "Conversations") put to the model
through its chat API (`NextMM.replies`), scored turn by turn as the spec says: text answers by exact match, boxes by
IoU >= 0.5, drawings by the pixel judge (all the objects asked for, each with its colour and shape, as eval/images.py
scores text-to-image).

Every turn is asked with the reference history before it (teacher forcing): the earlier assistant turns are the
conversation's own answers and pictures, never the model's, so one wrong answer does not drag the later turns down
and each turn type is measured on its own. Held out as the other Shapes World figures are: another seed than the
training data's (evaluation.EVAL_SEED).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from nextmm.api import NextMM
from nextmm.chat import ContextFull, Message, Reply
from nextmm.data.sample import Image, Sample, Text, Turn
from nextmm.eval.metrics import box_iou
from nextmm.tokenizer import LOC_SPAN
from nextmm.worlds.shapes import generator as shapes
from nextmm.worlds.shapes.evaluation import EVAL_SEED
from nextmm.worlds.shapes.judge import objects_in_caption, score_prompt


def to_messages(sample: Sample) -> list[Message]:
    """A conversation sample as chat messages (nextmm/chat.py): its text as text, pictures as PIL images, a video as
    its list of frames."""
    messages: list[Message] = []
    for seg in sample.segments:
        if isinstance(seg, Turn):
            messages.append({"role": seg.role, "content": []})
        elif messages:
            part = seg.text if isinstance(seg, Text) else seg.image if isinstance(seg, Image) else list(seg.frames)
            messages[-1]["content"].append(part)
        else:  # text before the first turn is the system message
            messages.append({"role": "system", "content": seg.text})
    return messages


def turn_prompts(sample: Sample) -> list[list[Message]]:
    """For each user turn, the conversation up to and including it: the prompt that turn's answer replies to."""
    messages = to_messages(sample)
    return [messages[:k + 1] for k, message in enumerate(messages) if message["role"] == "user"]


def reply_box(text: str) -> tuple[float, ...] | None:
    """The box a reply writes, `<loc>x0 y0 x1 y1</loc>` in fractions of the picture (tokenizer.loc_text), in pixels of
    the Shapes World canvas; None when it writes no such box."""
    match = LOC_SPAN.search(text)
    try:
        fractions = [float(v) for v in match.group(1).split()] if match else []
    except ValueError:
        return None
    return tuple(f * shapes.CANVAS for f in fractions) if len(fractions) == 4 else None


def turn_right(turn: dict[str, Any], reply: Reply) -> bool:
    """Whether a reply answers a conversation turn (a record of meta["turns"]) as the spec scores it."""
    if turn["type"] == "draw":
        return bool(reply.images) and score_prompt(reply.images[0], objects_in_caption(turn["answer"]))["all_objects_right"]
    if turn["type"] == "ground":
        box = reply_box(reply.text)
        return box is not None and box_iou(box, turn["box"]) >= 0.5
    return reply.text.strip() == turn["answer"]


def evaluate_conversations(m: NextMM, n: int = 200, seed: int = EVAL_SEED, max_new_tokens: int = 32, examples: int = 2,
                           **draw_options) -> dict[str, Any]:
    """Every turn of `n` held-out conversations, asked in one batched `m.replies` (draw turns drawn with
    `draw_options`). Returns {"turns": {type: accuracy}, "overall": accuracy over all turns, "counts": {type: turns
    scored}, "too_long": turns whose prompt leaves no room in the model's context (left out), "draw_opened": the
    share of draw turns whose reply opened a picture, whatever was drawn, "examples": the first `examples` turns of
    each type with the model's reply, "conversations": n, "seed": seed}."""
    asked: list[tuple[dict[str, Any], list[Message]]] = []
    too_long = 0
    for sample in shapes.make_samples("conversation", seed, n):
        for turn, messages in zip(sample.meta["turns"], turn_prompts(sample), strict=True):
            try:
                m.prompt_tokens(messages, max_new_tokens)
                asked.append((turn, messages))
            except ContextFull:
                too_long += 1
    replies = m.replies([messages for _, messages in asked], max_new_tokens=max_new_tokens, **draw_options) if asked else []
    hits: dict[str, list[bool]] = defaultdict(list)
    shown: list[dict[str, Any]] = []
    for (turn, messages), reply in zip(asked, replies, strict=True):
        hits[turn["type"]].append(turn_right(turn, reply))
        if len(hits[turn["type"]]) <= examples:
            shown.append({"type": turn["type"], "question": turn["question"], "truth": turn["answer"], "prediction": reply.text,
                          "drawn": reply.images[0] if reply.images else None, "history": len(messages) // 2})
    opened = [reply.finish_reason == "image" for (turn, _), reply in zip(asked, replies) if turn["type"] == "draw"]
    every = [hit for turn_hits in hits.values() for hit in turn_hits]
    return {
        "turns": {kind: _mean(h) for kind, h in sorted(hits.items())},
        "overall": _mean(every),
        "counts": {kind: len(h) for kind, h in sorted(hits.items())},
        "too_long": too_long,
        "draw_opened": _mean(opened),
        "examples": shown,
        "conversations": n,
        "seed": seed,
    }


def _mean(hits: Sequence[bool]) -> float:
    return round(float(np.mean(hits)), 4) if len(hits) else 0.0

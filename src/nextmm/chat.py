"""Conversations with the model: messages in, replies out, streamed as they are decoded, many in one batch.

A message is `{"role": "system" | "user" | "assistant", "content": str | [part, ...]}`, a part being text (a str),
a picture (a PIL image or a path) or a video (a list of pictures); an assistant message may hold a picture it drew.
The prompt is Emu-I's template (data/sequence.py): `{system} [USER]: {content} [ASSISTANT]:`, one turn after the
other, each assistant turn closed by `[EOS]`.

`stream_replies` decodes a batch of conversations together and says what happens as it happens (`Event`s): text as it
is decoded, a drawing when a reply opens a picture (its embeddings regressed and rendered, as `NextMM.draw` does),
and each reply's end, as soon as that reply ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, MutableSet, Sequence

from PIL import Image as PILImage

from nextmm.data.sample import Segment, Text, Turn
from nextmm.data.sequence import SequenceTooLong
from nextmm.errors import UserError
from nextmm.generate import stream_ids

if TYPE_CHECKING:
    from nextmm.api import NextMM

Message = dict[str, Any]


class ChatError(UserError):
    pass


class ContextFull(ChatError):
    pass


@dataclass
class Reply:
    text: str = ""
    images: list[PILImage.Image] = field(default_factory=list)
    finish_reason: str = "stop"  # "stop": it ended its turn; "length": out of tokens; "image": it drew (or would have)
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Event:
    row: int
    kind: str  # "text" (a piece of the reply), "image" (its drawing), "end" (the whole reply, in `reply`)
    text: str = ""
    image: PILImage.Image | None = None
    reply: Reply | None = None


def _content(message: Message, k: int) -> list[Segment]:
    from nextmm.api import to_segments  # api imports this module

    content = message.get("content")
    if isinstance(content, str):
        content = [content]
    if not isinstance(content, (list, tuple)):
        raise ChatError(f"message {k + 1}'s content is a {type(content).__name__}; give text or a list of text, pictures and videos")
    for part in content:
        if not isinstance(part, (str, Path, PILImage.Image, list, tuple)):
            raise ChatError(f"message {k + 1} holds a {type(part).__name__}; a part is text, a picture (a PIL image or a path) or a video (a list of pictures)")
    return to_segments([part for part in content if not (isinstance(part, str) and not part.strip())])


def to_conversation(messages: Sequence[Message]) -> list[Segment]:
    """The prompt for the model's next reply: the messages in Emu-I's template, then an open assistant turn."""
    if not messages:
        raise ChatError("the conversation has no messages; give at least one user message")
    segments: list[Segment] = []
    for k, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "system":
            if k:
                raise ChatError(f"message {k + 1} is a system message; the system message may only come first")
            text = message.get("content")
            if not isinstance(text, str):
                raise ChatError("the system message's content must be text")
            segments += [Text(text, target=False)] if text.strip() else []
        elif role in ("user", "assistant"):
            segments += [Turn(role), *_content(message, k)]
        else:
            raise ChatError(f"message {k + 1} has role {role!r}; use 'system', 'user' or 'assistant'")
    if messages[-1]["role"] != "user":
        raise ChatError("the last message must be the user's: the model replies to it")
    return segments + [Turn("assistant")]


def prompt_length(m: "NextMM", segments: list[Segment]) -> int:
    try:
        return len(m.builder.encode(segments, close=False).ids)
    except SequenceTooLong as err:
        return err.length  # room() says it in the conversation's words


def room(m: "NextMM", length: int, max_new_tokens: int) -> int:
    """How many tokens a reply to a prompt of `length` may write, or ContextFull when it may write none."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ChatError(f"max_new_tokens is {max_new_tokens!r}; give a whole number of tokens, 1 or more")
    left = m.builder.max_len - length
    if left < 1:
        raise ContextFull(
            f"the conversation is {length} tokens and the model's context is {m.builder.max_len}, which leaves no room for a "
            "reply; start a new conversation or drop earlier turns"
        )
    return min(max_new_tokens, left)


class _Row:
    """One reply being written: its tokens, the text already given out, and whether it has ended (and why)."""

    def __init__(self, m: "NextMM", prompt_tokens: int, limit: int):
        self.m, self.limit, self.ids, self.given, self.ended = m, limit, [], "", False
        self.reply = Reply(prompt_tokens=prompt_tokens)

    @property
    def drew(self) -> bool:
        return self.reply.finish_reason == "image"

    def add(self, token: int) -> str:
        """The text the token adds; held back while it ends in a partial character (a byte-level piece)."""
        tok = self.m.tokenizer
        self.ids.append(token)
        self.reply.completion_tokens = len(self.ids)
        if token in (tok.eos_id, tok.img_id):
            self.reply.finish_reason, self.ended = "stop" if token == tok.eos_id else "image", True
            return ""
        if len(self.ids) >= self.limit:
            self.reply.finish_reason, self.ended = "length", True
        text = tok.decode_with_boxes(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.given):
            return ""
        delta, self.given = text[len(self.given):], text
        self.reply.text = text
        return delta


def stream_replies(m: "NextMM", conversations: Sequence[Sequence[Message]], max_new_tokens: int | Sequence[int] = 64,
                   stop: MutableSet[int] | None = None, **draw_options) -> Iterator[Event]:
    """Replies to a batch of conversations, decoded together, as `Event`s (the module's doc). `stop`: rows the caller
    may add to while this runs; they end at once, as they stand, and draw nothing."""
    prompts = [to_conversation(c) for c in conversations]
    wanted = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(wanted) != len(prompts):
        raise ChatError(f"{len(prompts)} conversations were given {len(wanted)} token limits; give one, or one per conversation")
    lengths = [prompt_length(m, p) for p in prompts]
    rows = [_Row(m, length, room(m, length, n)) for length, n in zip(lengths, wanted)]
    stop = set() if stop is None else stop
    for start in range(0, len(prompts), m.batch_size):
        part = range(start, min(start + m.batch_size, len(prompts)))
        for step in stream_ids(m.model, m.builder, [prompts[i] for i in part], [rows[i].limit for i in part], precision=m.precision,
                               stop=_Shifted(stop, start)):
            for local, token in step:
                row = rows[start + local]
                delta = row.add(token)
                if delta:
                    yield Event(start + local, "text", text=delta)
                if row.ended and not row.drew:
                    yield Event(start + local, "end", reply=row.reply)
        for i in part:
            if not rows[i].ended or (rows[i].drew and i in stop):  # stopped from outside
                yield Event(i, "end", reply=rows[i].reply)
        yield from _draw_rows(m, prompts, rows, [i for i in part if rows[i].drew and i not in stop], draw_options)


def _draw_rows(m: "NextMM", prompts: list[list[Segment]], rows: list[_Row], drawing: list[int], draw_options: dict) -> Iterator[Event]:
    """The pictures the rows in `drawing` opened, drawn together; without a decoder, or without room in the context
    for the picture, the reply ends as it stands."""
    from nextmm.api import noise_numbers  # api imports this module

    fits = [i for i in drawing if rows[i].reply.prompt_tokens + len(rows[i].ids) + m.model.num_queries <= m.builder.max_len]
    if m.decoder is not None and fits:
        written = [prompts[i] + ([Text(rows[i].reply.text, target=False)] if rows[i].reply.text else []) for i in fits]
        options = {"seed": 0, **draw_options}
        alone = [noise_numbers(options.pop("seed"), 1)[0]] * len(fits)  # each reply's picture what it would be alone
        for i, image in zip(fits, m._draw(written, noises=alone, **options)):
            rows[i].reply.images.append(image)
            yield Event(i, "image", image=image)
    for i in drawing:
        yield Event(i, "end", reply=rows[i].reply)


class _Shifted:
    """A window of the caller's stop set: the rows of one batch, numbered from 0."""

    def __init__(self, rows: MutableSet[int], start: int):
        self.rows, self.start = rows, start

    def __contains__(self, row: object) -> bool:
        return isinstance(row, int) and row + self.start in self.rows

    def __iter__(self) -> Iterator[int]:
        return (row - self.start for row in list(self.rows) if row >= self.start)

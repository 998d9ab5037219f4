"""The one in-memory form every data source produces and every consumer reads.

A sample is an interleaved document: an ordered list of segments, each a piece of text, an image, or a
video (a list of frames). Shapes World, COCO, VQAv2, MMC4 and frame folders all become `Sample`s, are
written to the same WebDataset shards, and are turned into token sequences by `data/sequence.py`.

A conversation (instruction tuning, chat) is a sample whose segments are split into turns by `Turn` markers:
`Turn("user")`, what the user says and shows, `Turn("assistant")`, its answer (target text, or a picture it draws).
Text before the first turn is the system message. Only the assistant's turns are learned: their text, the end of
each turn, and the pictures they hold, which are regressed as in pretraining; the user's pictures are only read.

`Text.target` says whether the model is trained to predict that text (cross-entropy). Prompts that the
user supplies at inference time (a VQA question) are not targets; what the model must produce is.
The prompt wording of each task lives here so that training and inference can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from PIL import Image as PILImage


@dataclass
class Text:
    text: str
    target: bool = True


@dataclass
class Image:
    image: PILImage.Image


@dataclass
class Video:
    frames: list[PILImage.Image]


ROLES = ("user", "assistant")


@dataclass
class Turn:
    """Where a turn of a conversation starts, and whose it is ("user" or "assistant")."""

    role: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"a turn's role is '{self.role}'; use one of {', '.join(ROLES)}")


Segment = Union[Text, Image, Video, Turn]


@dataclass
class Sample:
    key: str
    kind: str
    segments: list[Segment]
    meta: dict[str, Any] = field(default_factory=dict)

    def images(self) -> list[PILImage.Image]:
        """Every picture in reading order, video frames included."""
        out: list[PILImage.Image] = []
        for seg in self.segments:
            if isinstance(seg, Image):
                out.append(seg.image)
            elif isinstance(seg, Video):
                out.extend(seg.frames)
        return out

    def captioned_image(self) -> tuple[PILImage.Image, str] | None:
        """The first image directly followed by target text (its caption), or None."""
        for seg, nxt in zip(self.segments, self.segments[1:]):
            if isinstance(seg, Image) and isinstance(nxt, Text) and nxt.target:
                return seg.image, nxt.text
        return None

    def claim(self) -> bool | None:
        """Whether the text after the sample's picture holds in it (AgreementJudge.agreement_loss): True for an
        image-caption pair, an image-text matching question's answer, None for every other sample."""
        if self.kind == "caption" and len(self.segments) == 2 and isinstance(self.segments[0], Image):
            return True
        if self.kind == "itm" and self.meta.get("answer") in ("yes", "no"):
            return self.meta["answer"] == "yes"
        return None


    def named_box(self) -> tuple[int, tuple[float, ...]] | None:
        """(index of the text segment, box x0 y0 x1 y1 in fractions of the image) of the one object the
        sample's text names, from `meta["named_box"]`; training tells the location pointer that object's
        patches where that text ends (pretrain.point_at_named). None when the data names none."""
        named = self.meta.get("named_box")
        return (int(named[0]), tuple(float(v) for v in named[1])) if named else None

    def regions(self) -> list[tuple[int, str, tuple[float, ...]]]:
        """(index of the image segment, phrase, box in fractions of the image) for every region the data
        describes, from `meta["regions"]` (pretrain.point_at_objects); empty when it describes none."""
        return [(int(segment), str(phrase), tuple(float(v) for v in box)) for segment, phrase, box in self.meta.get("regions", [])]


def vqa_prompt(question: str) -> str:
    return f"question: {question.strip()} answer:"


def grounding_question(phrase: str) -> str:
    """Visual grounding as an instruction (OFA): the answer is the region's box as location tokens."""
    return f'which region does the text "{phrase}" describe?'


def matching_question(text: str) -> str:
    """Image-text matching as an instruction: the answer is yes or no."""
    return f'does the text "{text}" match the image?'


DETECT_QUESTION = "what objects are in the image and where?"  # answered "{phrase} {box}, ..." (OFA's detection)


def caption_sample(key: str, image: PILImage.Image, caption: str, **meta: Any) -> Sample:
    return Sample(key, "caption", [Image(image), Text(caption)], dict(meta))


def vqa_sample(key: str, image: PILImage.Image, question: str, answer: str, **meta: Any) -> Sample:
    segments = [Image(image), Text(vqa_prompt(question), target=False), Text(answer)]
    return Sample(key, "vqa", segments, dict(meta, question=question, answer=answer))


def video_caption_sample(key: str, frames: list[PILImage.Image], caption: str, **meta: Any) -> Sample:
    return Sample(key, "video_caption", [Video(list(frames)), Text(caption)], dict(meta))


def video_qa_sample(key: str, frames: list[PILImage.Image], question: str, answer: str, **meta: Any) -> Sample:
    segments = [Video(list(frames)), Text(vqa_prompt(question), target=False), Text(answer)]
    return Sample(key, "video_qa", segments, dict(meta, question=question, answer=answer))


def conversation_segments(turns: list[tuple[str, list[Segment]]], system: str = "") -> list[Segment]:
    """A conversation's segments from (role, content) turns: the user's text is context, the assistant's is the
    target; pictures keep their place (an assistant's is one it draws). `system` opens it when given."""
    segments: list[Segment] = [Text(system, target=False)] if system.strip() else []
    for role, content in turns:
        segments.append(Turn(role))
        for seg in content:
            segments.append(Text(seg.text, target=role == "assistant") if isinstance(seg, Text) else seg)
    return segments


def conversation_sample(key: str, turns: list[tuple[str, list[Segment]]], system: str = "", **meta: Any) -> Sample:
    return Sample(key, "conversation", conversation_segments(turns, system), dict(meta))

"""Samples -> token sequences -> padded batches.

One picture becomes `[IMG]` + N x `<image>` + `[/IMG]`; a video becomes one such block per frame (every
frame, or `vision.video_frames` of them evenly spaced, in training and inference alike).
`labels[t]` is the token the model must predict at position t (the next one), or IGNORE: the words of
target text segments, the closing `[EOS]`, and an `[IMG]` that directly follows target text (so that a
continuation can decide to draw: `complete()` then regresses the image); never `[PAD]`, `<image>`, `[/IMG]`.

A conversation's turns (data/sample.py, `Turn`) open with `[USER]:` or `[ASSISTANT]:` (Emu-I's template,
`{system} [USER]: {content} [ASSISTANT]:`), and each assistant turn closes with `[EOS]`, which it learns, so that
a reply ends where decoding stops. An assistant's `[IMG]` is learned (it decides to draw) and its picture is
regressed; a user's picture is only read (`Encoded.drawn`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image as PILImage

from nextmm.config import Config
from nextmm.data.sample import Image, Segment, Text, Turn, Video
from nextmm.data.transforms import to_pixels
from nextmm.errors import UserError
from nextmm.models.emu import IGNORE
from nextmm.tokenizer import NextTokenizer


class SequenceTooLong(UserError):
    def __init__(self, message: str, length: int = 0):
        super().__init__(message)
        self.length = length


@dataclass
class Encoded:
    ids: list[int] = field(default_factory=list)
    targets: list[bool] = field(default_factory=list)
    images: list[PILImage.Image] = field(default_factory=list)
    drawn: list[bool] = field(default_factory=list)  # per picture: whether its embeddings are regressed (see the module's doc)
    named: list[tuple[int, tuple[float, ...]]] = field(default_factory=list)  # (position, box) pairs, see encode
    regions: list[tuple[int, list[int], tuple[float, ...]]] = field(default_factory=list)  # (image, phrase ids, box), see encode
    claim: int = -1  # 1: the text after the last picture holds in it, 0: it does not, -1: no claim (see encode)

    def add(self, ids: list[int], target: bool = False) -> None:
        self.ids.extend(ids)
        self.targets.extend([target] * len(ids))

    @property
    def labels(self) -> list[int]:
        return [nxt if is_target else IGNORE for nxt, is_target in zip(self.ids[1:], self.targets[1:])] + [IGNORE]


class SequenceBuilder:
    def __init__(self, tokenizer: NextTokenizer, num_queries: int, image_size: int, max_len: int, video_frames: int = 0):
        self.tok = tokenizer
        self.num_queries = num_queries
        self.image_size = image_size
        self.max_len = max_len
        self.video_frames = video_frames

    @classmethod
    def for_config(cls, tokenizer: NextTokenizer, cfg: Config) -> "SequenceBuilder":
        return cls(tokenizer, cfg.resampler.num_queries, cfg.vision.image_size, cfg.llm.max_seq_len, cfg.vision.video_frames)

    def frames_of(self, video: Video) -> list[PILImage.Image]:
        """Every frame, or `video_frames` of them evenly spaced from the first to the last."""
        frames, k = video.frames, self.video_frames
        if not k or len(frames) <= k:
            return frames
        if k == 1:
            return [frames[len(frames) // 2]]
        return [frames[round(i * (len(frames) - 1) / (k - 1))] for i in range(k)]

    def image_block(self) -> list[int]:
        return [self.tok.img_id] + [self.tok.image_id] * self.num_queries + [self.tok.img_end_id]

    def encode(
        self,
        segments: list[Segment],
        close: bool = True,
        named: tuple[int, tuple[float, ...]] | None = None,
        regions: list[tuple[int, str, tuple[float, ...]]] = (),
        claim: bool | None = None,
    ) -> Encoded:
        """close=True ends the sequence with [EOS] (learned when the last segment is a target);
        close=False leaves it open for the model to continue (an inference prompt). `named` (segment index,
        box in fractions of the image): that text segment names the object in the box, which its last
        token's location pointer is told in training (LocationHead.pointer_loss). `regions` (image segment index,
        phrase, box): phrases of what those boxes of the pictures show, for LocationHead.region_loss. `claim`: whether the
        text after the last picture holds in it (Sample.claim), for AgreementJudge.agreement_loss."""
        out = Encoded(claim=-1 if claim is None else int(claim))
        pictures = [i for i, seg in enumerate(segments) if isinstance(seg, Image)]
        for segment, phrase, box in regions:
            if segment not in pictures:
                raise ValueError(f"a region names segment {segment}, which is not an image")
            out.regions.append((pictures.index(segment), self.tok.encode(phrase), tuple(box)))
        out.add(self.tok.start_ids)
        in_turns = any(isinstance(seg, Turn) for seg in segments)
        role = None  # the open turn's
        for i, seg in enumerate(segments):
            if isinstance(seg, Turn):
                if role == "assistant":
                    out.add([self.tok.eos_id], True)
                role = seg.role
                out.add([self.tok.user_id if role == "user" else self.tok.assistant_id] + self.tok.encode(":"))
            elif isinstance(seg, Text):
                out.add(self.tok.encode(seg.text), seg.target)
                if named is not None and named[0] == i:
                    out.named.append((len(out.ids) - 1, tuple(named[1])))
            elif isinstance(seg, Image):
                after_target_text = i > 0 and isinstance(segments[i - 1], Text) and segments[i - 1].target
                block = self.image_block()
                out.add(block[:1], after_target_text or role == "assistant")
                out.add(block[1:])
                out.images.append(seg.image)
                out.drawn.append(not in_turns or role == "assistant")
            elif isinstance(seg, Video):
                for frame in self.frames_of(seg):
                    out.add(self.image_block())
                    out.images.append(frame)
                    out.drawn.append(not in_turns or role == "assistant")
            else:
                raise TypeError(f"a prompt may hold text, images, videos and turns, not {type(seg).__name__}")
        if close:
            ends_in_target = bool(segments) and isinstance(segments[-1], Text) and segments[-1].target
            out.add([self.tok.eos_id], ends_in_target or role == "assistant")
        if len(out.ids) > self.max_len:
            raise SequenceTooLong(
                f"the sequence is {len(out.ids)} tokens but the model's context is {self.max_len}; "
                "use fewer images or shorter text", len(out.ids)
            )
        return out

    def collate(self, batch: list[Encoded], left_pad: bool = False) -> dict[str, torch.Tensor]:
        """Right padding for training (causal attention never looks ahead at the pads); left padding for
        generation, so every row's next token lands in the same column."""
        out = self.lay_out([[e] for e in batch], max(len(e.ids) for e in batch), left_pad)
        del out["documents"]  # one sample a row: the row is the sample
        return out

    def lay_out(self, rows: list[list[Encoded]], width: int, left_pad: bool = False) -> dict[str, torch.Tensor]:
        """Rows of `width` tokens, each holding its samples end to end, padded after them (before, with
        `left_pad`). `documents` (B, T) numbers the samples in reading order (-1: padding); the pictures,
        regions and claims (one per sample) follow that order."""
        ids = torch.full((len(rows), width), self.tok.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        valid = torch.zeros((len(rows), width), dtype=torch.bool)
        documents = torch.full((len(rows), width), -1, dtype=torch.long)
        named = torch.full((len(rows), width, 4), float("nan"))
        order = [e for row in rows for e in row]
        number = iter(range(len(order)))
        for r, row in enumerate(rows):
            start = width - sum(len(e.ids) for e in row) if left_pad else 0
            for e in row:
                end = start + len(e.ids)
                ids[r, start:end] = torch.tensor(e.ids)
                labels[r, start:end] = torch.tensor(e.labels)
                valid[r, start:end] = True
                documents[r, start:end] = next(number)
                for position, box in e.named:
                    named[r, start + position] = torch.tensor(box)
                start = end
        pixels = to_pixels([img for e in order for img in e.images], self.image_size)
        claims = torch.tensor([e.claim for e in order], dtype=torch.long)
        drawn = torch.tensor([d for e in order for d in e.drawn], dtype=torch.bool)
        return {"input_ids": ids, "labels": labels, "valid": valid, "documents": documents, "pixels": pixels, "named_boxes": named,
                "claims": claims, "drawn": drawn, **self.collate_regions(order)}

    @staticmethod
    def collate_regions(batch: list[Encoded]) -> dict[str, torch.Tensor]:
        """The batch's regions: `region_ids` (K, L) their phrases, padded with -1; `region_image` (K,) their
        pictures among the batch's images, in reading order; `region_boxes` (K, 4) in fractions of the image."""
        first_image = 0
        images, phrases, boxes = [], [], []
        for e in batch:
            for image, phrase, box in e.regions:
                images.append(first_image + image)
                phrases.append(torch.tensor(phrase, dtype=torch.long))
                boxes.append(box)
            first_image += len(e.images)
        if not phrases:
            return {"region_ids": torch.full((0, 1), -1), "region_image": torch.zeros(0, dtype=torch.long), "region_boxes": torch.zeros(0, 4)}
        return {
            "region_ids": torch.nn.utils.rnn.pad_sequence(phrases, batch_first=True, padding_value=-1),
            "region_image": torch.tensor(images, dtype=torch.long),
            "region_boxes": torch.tensor(boxes, dtype=torch.float),
        }

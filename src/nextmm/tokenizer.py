"""Byte-level BPE (trained with the `tokenizers` library) plus nextmm's special and location tokens.

Every text segment is encoded with a leading space, so a word has the same ids wherever it stands:
training and inference build sequences segment by segment and must agree token for token.

A box in data text is written `<loc>x0 y0 x1 y1</loc>`, each coordinate a fraction of the image's
width or height, so shards do not depend on any tokenizer; `encode` turns it into OFA's four location
tokens `<bin_k>` (k = round(fraction x (bins - 1))) with this tokenizer's number of bins.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "[PAD]", "[BOS]", "[EOS]"
IMG, IMG_END, IMAGE = "[IMG]", "[/IMG]", "<image>"
USER, ASSISTANT = "[USER]", "[ASSISTANT]"
SPECIAL_TOKENS = [PAD, BOS, EOS, IMG, IMG_END, IMAGE, USER, ASSISTANT]


LOC_SPAN = re.compile(r"<loc>([^<]*)</loc>")


def location_token(k: int) -> str:
    return f"<bin_{k}>"


def loc_text(box: Sequence[float], image_size: int | tuple[int, int]) -> str:
    """A pixel box (x0, y0, x1, y1) as data text: `<loc>...</loc>` in fractions of the image size."""
    width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
    fractions = [v / s for v, s in zip(box, (width, height, width, height))]
    return "<loc>" + " ".join(f"{f:.4f}" for f in fractions) + "</loc>"


def special_tokens(location_bins: int) -> list[str]:
    return SPECIAL_TOKENS + [location_token(k) for k in range(location_bins)]


class NextTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; train it with nextmm's tokenizer")
        self.pad_id, self.bos_id, self.eos_id = ids[PAD], ids[BOS], ids[EOS]
        self.img_id, self.img_end_id, self.image_id = ids[IMG], ids[IMG_END], ids[IMAGE]
        self.user_id, self.assistant_id = ids[USER], ids[ASSISTANT]
        self.location_bins = 0
        while tokenizer.token_to_id(location_token(self.location_bins)) is not None:
            self.location_bins += 1

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 512, location_bins: int = 64) -> "NextTokenizer":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        specials = special_tokens(location_bins)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size + len(specials),
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "NextTokenizer":
        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for k, part in enumerate(LOC_SPAN.split(text)):
            if k % 2:  # a <loc> span's inside
                ids += self._location_span(part)
            elif part.strip():
                ids += self.tok.encode(part.strip(), add_special_tokens=False).ids
        return ids

    def _location_span(self, inside: str) -> list[int]:
        try:
            fractions = [float(v) for v in inside.split()]
        except ValueError:
            fractions = []
        if len(fractions) != 4 or not all(0.0 <= f <= 1.0 for f in fractions):
            raise ValueError(f"'<loc>{inside}</loc>' is not a box: write four fractions of the image size from 0 to 1, x0 y0 x1 y1")
        if not self.location_bins:
            raise ValueError("this tokenizer has no location tokens; train it with location_bins > 0 to read <loc> boxes")
        return self.location_ids(fractions, 1)

    def box_from_ids(self, ids: Sequence[int], image_size: int | tuple[int, int]) -> tuple[float, ...] | None:
        """The first four location tokens among `ids` as a pixel box (bin centres), or None when there are fewer."""
        width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
        bins = [k for k in (self._bin_of(i) for i in ids) if k is not None][:4]
        if len(bins) < 4:
            return None
        scale = self.location_bins - 1
        return tuple(b / scale * s for b, s in zip(bins, (width, height, width, height)))

    def phrases_with_boxes(self, ids: Sequence[int], image_size: int | tuple[int, int]) -> list[tuple[str, tuple[float, ...]]]:
        """Detection output, "a red circle <4 location tokens>, a blue square <4 location tokens>", as
        (phrase, pixel box) pairs; text with no complete box after it is dropped."""
        found, words, bins = [], [], []
        for token_id in ids:
            if self._bin_of(token_id) is None:
                words.append(token_id)
                continue
            bins.append(token_id)
            if len(bins) == 4:
                found.append((self.decode(words).strip(" ,;"), self.box_from_ids(bins, image_size)))
                words, bins = [], []
        return found

    @property
    def special_ids(self) -> list[int]:
        """The ids of [PAD], [BOS], [EOS], the image and turn markers."""
        return [self.tok.token_to_id(t) for t in SPECIAL_TOKENS]

    @property
    def bin_ids(self) -> list[int]:
        """The ids of `<bin_0>` ... `<bin_{B-1}>`, in order."""
        return [self.tok.token_to_id(location_token(k)) for k in range(self.location_bins)]

    def _bin_of(self, token_id: int) -> int | None:
        token = self.tok.id_to_token(token_id) or ""
        return int(token[5:-1]) if token.startswith("<bin_") and token.endswith(">") else None

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special).strip()

    def location_ids(self, box: Sequence[float], image_size: int | tuple[int, int]) -> list[int]:
        """OFA's box tokens: x0 y0 x1 y1, each coordinate / image size x (B-1), rounded."""
        width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
        scale = self.location_bins - 1
        bins = [round(v / s * scale) for v, s in zip(box, (width, height, width, height))]
        return [self.tok.token_to_id(location_token(min(max(b, 0), scale))) for b in bins]

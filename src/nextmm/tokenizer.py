"""Byte-level BPE (trained with the `tokenizers` library) plus nextmm's special and location tokens.

Every text segment is encoded with a leading space, so a word has the same ids wherever it stands:
training and inference build sequences segment by segment and must agree token for token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "[PAD]", "[BOS]", "[EOS]"
IMG, IMG_END, IMAGE = "[IMG]", "[/IMG]", "<image>"
USER, ASSISTANT = "[USER]", "[ASSISTANT]"
SPECIAL_TOKENS = [PAD, BOS, EOS, IMG, IMG_END, IMAGE, USER, ASSISTANT]


def location_token(k: int) -> str:
    return f"<bin_{k}>"


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
        return self.tok.encode(text.strip(), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special).strip()

    def location_ids(self, box: Sequence[float], image_size: int | tuple[int, int]) -> list[int]:
        """OFA's box tokens: x0 y0 x1 y1, each coordinate / image size x (B-1), rounded."""
        width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
        scale = self.location_bins - 1
        bins = [round(v / s * scale) for v, s in zip(box, (width, height, width, height))]
        return [self.tok.token_to_id(location_token(min(max(b, 0), scale))) for b in bins]

"""Byte-level BPE (trained with the `tokenizers` library) plus nextmm's special and location tokens.

Every text segment is encoded with a leading space, so a word has the same ids wherever it stands:
training and inference build sequences segment by segment and must agree token for token.

A box in data text is written `<loc>x0 y0 x1 y1</loc>`, each coordinate a fraction of the image's
width or height, so shards do not depend on any tokenizer; `encode` turns it into OFA's four location
tokens `<bin_k>` (k = round(fraction x (bins - 1))) with this tokenizer's number of bins.

A pretrained LLM brings its own tokenizer (`NextTokenizer.from_llm`): its tokenizer.json, its own BOS,
EOS and PAD, and Emu's tokens added after its vocabulary. Which tokens play BOS, EOS and PAD, and whether
a sequence starts with BOS at all, is saved beside tokenizer.json in Hugging Face's tokenizer_config.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from nextmm.errors import UserError

PAD, BOS, EOS = "[PAD]", "[BOS]", "[EOS]"
IMG, IMG_END, IMAGE = "[IMG]", "[/IMG]", "<image>"
USER, ASSISTANT = "[USER]", "[ASSISTANT]"
SPECIAL_TOKENS = [PAD, BOS, EOS, IMG, IMG_END, IMAGE, USER, ASSISTANT]
EMU_TOKENS = [IMG, IMG_END, IMAGE, USER, ASSISTANT]
ROLES_FILE = "tokenizer_config.json"  # Hugging Face's name for the file that says which token is BOS, EOS, PAD
# Fills a pretrained LLM's embedding rows that its tokenizer leaves unnamed (Qwen pads its vocabulary to a
# round size), so that the tokens nextmm adds get the rows after the embedding matrix.
UNUSED_ROW = "<|nextmm_unused_{}|>"


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
    """Text to ids and back. `bos`, `eos` and `pad` name the tokens in those roles (nextmm's own `[BOS]`
    `[EOS]` `[PAD]` by default); `add_bos` says whether a sequence starts with BOS, which Qwen's do not."""

    def __init__(self, tokenizer: Tokenizer, bos: str | None = BOS, eos: str = EOS, pad: str = PAD, add_bos: bool = True):
        self.tok = tokenizer
        ids = {t: tokenizer.token_to_id(t) for t in [pad, eos, *([bos] if bos else []), *EMU_TOKENS]}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise UserError(f"tokenizer lacks the special tokens {missing}; train it with nextmm's tokenizer or build it with NextTokenizer.from_llm")
        if add_bos and not bos:
            raise UserError("the tokenizer starts sequences with BOS but names no BOS token; set bos_token in its tokenizer_config.json")
        self.bos, self.eos, self.pad, self.add_bos = bos, eos, pad, add_bos
        self.pad_id, self.eos_id, self.bos_id = ids[pad], ids[eos], ids[bos] if bos else None
        self.img_id, self.img_end_id, self.image_id = ids[IMG], ids[IMG_END], ids[IMAGE]
        self.user_id, self.assistant_id = ids[USER], ids[ASSISTANT]
        self.location_bins = 0
        while tokenizer.token_to_id(location_token(self.location_bins)) is not None:
            self.location_bins += 1

    @classmethod
    def from_llm(cls, llm_dir: str | Path, location_bins: int = 0) -> tuple["NextTokenizer", int]:
        """A pretrained LLM's own tokenizer (`llm_dir`/tokenizer.json) with Emu's tokens, a `[PAD]` where the
        LLM has no pad of its own, and `location_bins` location tokens added as special tokens; and how many
        rows the LLM's embedding and output matrices must grow by (convert.hf_llm.grow_vocabulary) for the
        added ids, which follow the matrices' last row."""
        root = Path(llm_dir)
        if not (root / "tokenizer.json").is_file():
            raise UserError(
                f"'{root}' holds no tokenizer.json; save the LLM's tokenizer there in the fast format "
                "(transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
            )
        tok = Tokenizer.from_file(str(root / "tokenizer.json"))
        files = [_json_beside(root / name) for name in (ROLES_FILE, "special_tokens_map.json")]
        model_config = _json_beside(root / "config.json")
        eos = _role(tok, "eos", files, model_config)
        if eos is None:
            raise UserError(f"'{root}' names no EOS token (eos_token in {ROLES_FILE} or special_tokens_map.json, or eos_token_id in config.json); add the LLM's end-of-text token there")
        starts_with = _added_bos(tok)
        bos = starts_with or _role(tok, "bos", files, model_config)
        pad = _role(tok, "pad", files, model_config)
        pad = pad if pad not in (None, eos, bos) else PAD  # a pad that is also EOS or BOS would look like padding wherever ids are compared
        rows = model_config.get("vocab_size") or _next_id(tok)
        _fill_unused_rows(tok, rows, root)
        wanted = [*EMU_TOKENS, *([PAD] if pad == PAD else []), *(location_token(k) for k in range(location_bins))]
        added = [t for t in wanted if tok.token_to_id(t) is None]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
        if [tok.token_to_id(t) for t in added] != list(range(rows, rows + len(added))):
            raise UserError(f"'{root}/tokenizer.json' gives the added tokens ids that do not follow the model's {rows} embedding rows; give a tokenizer whose ids run 0..{rows - 1} at most")
        return cls(tok, bos, eos, pad, add_bos=starts_with is not None), len(added)

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
        """A tokenizer.json and, where `save` wrote one beside it, the roles in its tokenizer_config.json;
        without that file, nextmm's own `[BOS]` `[EOS]` `[PAD]`."""
        tok = Tokenizer.from_file(str(path))
        roles = _json_beside(Path(path).with_name(ROLES_FILE))
        if not roles:
            return cls(tok)
        named = {role: _content(roles.get(f"{role}_token")) for role in ("bos", "eos", "pad")}
        return cls(tok, named["bos"], named["eos"] or EOS, named["pad"] or PAD, roles.get("add_bos_token", True))

    def save(self, path: str | Path) -> None:
        """tokenizer.json at `path` and the roles beside it, in a tokenizer_config.json that Hugging Face's
        AutoTokenizer reads as well."""
        self.tok.save(str(path))
        roles = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos, "eos_token": self.eos,
                 "pad_token": self.pad, "add_bos_token": self.add_bos}
        Path(path).with_name(ROLES_FILE).write_text(json.dumps(roles, indent=2) + "\n")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def start_ids(self) -> list[int]:
        """What every sequence starts with: `[bos_id]`, or nothing for an LLM that uses no BOS (Qwen)."""
        return [self.bos_id] if self.add_bos else []

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
        return [(self.decode(words).strip(" ,;"), self.box_from_ids(box, image_size)) for words, box in self._boxed_runs(ids) if box]

    def _boxed_runs(self, ids: Sequence[int]) -> list[tuple[list[int], list[int]]]:
        """`ids` as (word ids, the four location ids of the box after them) runs; the last run's box is empty when no
        complete box follows its words (the location ids of an unfinished box are dropped)."""
        runs, words, bins = [], [], []
        for token_id in ids:
            if self._bin_of(token_id) is None:
                words.append(token_id)
                continue
            bins.append(token_id)
            if len(bins) == 4:
                runs.append((words, bins))
                words, bins = [], []
        return runs + [(words, [])]

    @property
    def special_ids(self) -> list[int]:
        """The ids of PAD, BOS, EOS, the image and turn markers."""
        roles = [self.pad_id, self.bos_id, self.eos_id, self.img_id, self.img_end_id, self.image_id, self.user_id, self.assistant_id]
        return [i for i in roles if i is not None]

    @property
    def bin_ids(self) -> list[int]:
        """The ids of `<bin_0>` ... `<bin_{B-1}>`, in order."""
        return [self.tok.token_to_id(location_token(k)) for k in range(self.location_bins)]

    def _bin_of(self, token_id: int) -> int | None:
        token = self.tok.id_to_token(token_id) or ""
        return int(token[5:-1]) if token.startswith("<bin_") and token.endswith(">") else None

    def decode_with_boxes(self, ids: Sequence[int]) -> str:
        """Text in which each run of four location tokens is a `<loc>x0 y0 x1 y1</loc>` box in fractions of the image
        (bin centres), the form `encode` reads back: what a reply that names places says (an unfinished box is left out)."""
        pieces = []
        for words, box in self._boxed_runs(ids):
            pieces.append(self.decode(words))
            if box:
                pieces.append("<loc>" + " ".join(f"{self._bin_of(b) / (self.location_bins - 1):.4f}" for b in box) + "</loc>")
        return " ".join(piece for piece in pieces if piece)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special).strip()

    def location_ids(self, box: Sequence[float], image_size: int | tuple[int, int]) -> list[int]:
        """OFA's box tokens: x0 y0 x1 y1, each coordinate / image size x (B-1), rounded."""
        width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
        scale = self.location_bins - 1
        bins = [round(v / s * scale) for v, s in zip(box, (width, height, width, height))]
        return [self.tok.token_to_id(location_token(min(max(b, 0), scale))) for b in bins]


def _json_beside(path: Path) -> dict:
    """A tokenizer's side file as a mapping; {} where there is none."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"'{path}' is not valid JSON ({err.__class__.__name__}); restore it from the model's source") from err


def _content(value: str | dict | None) -> str | None:
    """A token as Hugging Face writes it: its text, or {"content": text, ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _role(tok: Tokenizer, role: str, token_files: list[dict], model_config: dict) -> str | None:
    """The token an LLM names for `role` (bos, eos, pad): by text in its tokenizer files, else by id in its
    config.json (the first, where it lists several EOS ids)."""
    for values in token_files:
        if _content(values.get(f"{role}_token")):
            return _content(values[f"{role}_token"])
    token_id = model_config.get(f"{role}_token_id")
    if isinstance(token_id, list):
        token_id = token_id[0] if token_id else None
    return tok.id_to_token(token_id) if token_id is not None else None


def _added_bos(tok: Tokenizer) -> str | None:
    """The token the tokenizer's post-processor puts before a text, which Hugging Face's tokenizer(text)
    gives too; None where it puts none."""
    bare = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a").ids
    return tok.id_to_token(full[0]) if len(full) > len(bare) and full[1:len(bare) + 1] == bare else None


def _next_id(tok: Tokenizer) -> int:
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def _fill_unused_rows(tok: Tokenizer, rows: int, root: Path) -> None:
    """Names the embedding rows past the tokenizer's last id, so that added tokens follow all `rows`."""
    first_free = _next_id(tok)
    if first_free > rows:
        raise UserError(f"'{root}/tokenizer.json' has ids up to {first_free - 1} but config.json's vocab_size is {rows}; give the tokenizer that belongs to this model")
    tok.add_special_tokens([AddedToken(UNUSED_ROW.format(k), special=True, normalized=False) for k in range(rows - first_free)])

"""The Python API: `m = nextmm.load(model_dir)`, then `m.caption`, `m.ask`, `m.complete`.

A model directory holds `config.json`, `model.safetensors` and `tokenizer.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union

from PIL import Image as PILImage

from nextmm.config import Config, config_from_dict
from nextmm.data.formats import load_image
from nextmm.data.sample import Image, Segment, Text, Video, vqa_prompt
from nextmm.data.sequence import SequenceBuilder
from nextmm.errors import UserError
from nextmm.generate import generate_text
from nextmm.models.emu import Emu
from nextmm.tokenizer import NextTokenizer
from nextmm.train.checkpoint import load_module, save_module, write_atomically

Picture = Union[PILImage.Image, str, Path]
Visual = Union[Picture, Sequence[Picture]]  # a sequence of pictures is a video
PromptPart = Union[str, Picture, Sequence[Picture]]


class ModelDirError(UserError):
    pass


def _picture(item: Picture) -> PILImage.Image:
    if isinstance(item, PILImage.Image):
        return item.convert("RGB")
    return load_image(item)


def _visual_segment(item: Visual) -> Segment:
    if isinstance(item, (list, tuple)):
        if not item:
            raise ValueError("a video must have at least one frame")
        return Video([_picture(frame) for frame in item])
    return Image(_picture(item))


def to_segments(prompt: Sequence[PromptPart]) -> list[Segment]:
    """An interleaved prompt: strings are text, pictures are images, a list of pictures is a video."""
    if isinstance(prompt, str):
        prompt = [prompt]
    return [Text(part, target=False) if isinstance(part, str) else _visual_segment(part) for part in prompt]


class NextMM:
    def __init__(self, model: Emu, tokenizer: NextTokenizer, config: Config, batch_size: int = 64, precision: str = "fp32"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.batch_size = batch_size
        self.precision = precision
        self.builder = SequenceBuilder.for_config(tokenizer, config)

    def generate(self, prompts: list[list[Segment]], max_new_tokens: int = 32) -> list[str]:
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            out += generate_text(self.model, self.builder, chunk, max_new_tokens=max_new_tokens, precision=self.precision)
        return out

    def caption(self, images: Sequence[Visual], max_new_tokens: int = 32) -> list[str]:
        """One caption per image (or per video, given as a list of frames)."""
        return self.generate([[_visual_segment(img)] for img in images], max_new_tokens)

    def ask(self, images: Sequence[Visual], questions: Sequence[str], max_new_tokens: int = 8) -> list[str]:
        if len(images) != len(questions):
            raise ValueError(f"ask() got {len(images)} images but {len(questions)} questions; give one question per image")
        return self.generate(
            [[_visual_segment(img), Text(vqa_prompt(q), target=False)] for img, q in zip(images, questions)], max_new_tokens
        )

    def complete(self, prompts: Sequence[Sequence[PromptPart]], max_new_tokens: int = 32) -> list[str]:
        """Continue interleaved prompts, e.g. [img1, "this is a blicket", img2, "this is a"]."""
        return self.generate([to_segments(p) for p in prompts], max_new_tokens)

    def save(self, path: str | Path) -> Path:
        def fill(tmp: Path) -> None:
            (tmp / "config.json").write_text(self.config.to_json())
            save_module(self.model, tmp / "model.safetensors")
            self.tokenizer.save(tmp / "tokenizer.json")

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomically(path, fill)


def build_model(config: Config, tokenizer: NextTokenizer) -> Emu:
    config.llm.vocab_size = tokenizer.vocab_size
    return Emu(config, tokenizer.image_id)


def load(model_dir: str | Path, **kwargs) -> NextMM:
    root = Path(model_dir)
    needed = ["config.json", "model.safetensors", "tokenizer.json"]
    missing = [name for name in needed if not (root / name).is_file()]
    if missing:
        raise ModelDirError(
            f"'{root}' is not a nextmm model directory (missing {', '.join(missing)}); "
            "point --model at the model/ folder that `nextmm train` or `nextmm demo` wrote"
        )
    config = config_from_dict(json.loads((root / "config.json").read_text()))
    tokenizer = NextTokenizer.load(root / "tokenizer.json")
    model = build_model(config, tokenizer)
    try:
        load_module(model, root / "model.safetensors")
    except RuntimeError as err:  # torch reports missing, unexpected and mis-shaped weights this way
        raise ModelDirError(
            f"the weights in '{root / 'model.safetensors'}' do not fit the model its config.json describes "
            f"({str(err).splitlines()[-1].strip()}); the folder was changed by hand or saved by another nextmm, so retrain it"
        ) from None
    return NextMM(model, tokenizer, config, **kwargs)

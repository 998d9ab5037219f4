"""The Python API: `m = nextmm.load(model_dir)`, then `m.caption`, `m.ask`, `m.complete`, `m.draw`, `m.chat`.

The model runs on its device (`load(..., device=)`, `m.to(device)`); what the API returns (features,
embeddings, margins) comes back on the CPU.

A model directory holds `config.json`, `model.safetensors` and `tokenizer.json`, and `decoder/` (the
visual decoder in diffusers' format, models/decoder.py) when it can draw. `load` also takes an adapter folder
that `nextmm tune --adapter` wrote (peft's adapter_config.json and adapter_model.safetensors, naming its base model).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, MutableSet, Sequence, Union

import torch
from PIL import Image as PILImage

from nextmm import chat as chatting
from nextmm.config import NEGATIVES, Config, config_from_dict
from nextmm.constrained import AnswerError, AnswerTrie, BoxConstraint, Constraint, DetectionGrammar, RowAnswers
from nextmm.data.formats import load_image
from nextmm.data.sample import DETECT_QUESTION, Image, Segment, Text, Video, grounding_question, matching_question, vqa_prompt
from nextmm.data.sequence import SequenceBuilder
from nextmm.errors import UserError
from nextmm.data.transforms import to_pixels
from nextmm.device import device_of, pick_device
from nextmm.generate import generate_ids, generate_visual, next_token_logits
from nextmm.models.clip import CLIP, text_batch
from nextmm.models.decoder import VisualDecoder
from nextmm.models.emu import Emu
from nextmm.tokenizer import NextTokenizer
from nextmm.train.checkpoint import latest_checkpoint, load_module, resume_weights, save_module, write_atomically

Picture = Union[PILImage.Image, str, Path]
Visual = Union[Picture, Sequence[Picture]]  # a sequence of pictures is a video
PromptPart = Union[str, Picture, Sequence[Picture]]


class ModelDirError(UserError):
    pass


class DrawError(UserError):
    pass


MAX_GUIDANCE, MAX_STEPS, MAX_CANDIDATES = 50.0, 1000, 64


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


def class_prompts(labels: Sequence[str], template: str) -> list[str]:
    """Each label put in the template's {}: the texts zero-shot classification compares an image with."""
    if not labels:
        raise UserError("zero-shot classification needs at least one label")
    if "{}" not in template:
        raise UserError(f"template '{template}' has no {{}} for the label; write e.g. 'a photo of a {{}}'")
    return [template.format(label) for label in labels]


def to_segments(prompt: Sequence[PromptPart]) -> list[Segment]:
    """An interleaved prompt: strings are text, pictures are images, a list of pictures is a video."""
    if isinstance(prompt, str):
        prompt = [prompt]
    return [Text(part, target=False) if isinstance(part, str) else _visual_segment(part) for part in prompt]


class NextMM:
    def __init__(
        self, model: Emu, tokenizer: NextTokenizer, config: Config, batch_size: int = 64, precision: str = "fp32",
        decoder: VisualDecoder | None = None, clip: CLIP | None = None,
    ):
        self.model = model.eval()
        self.decoder = decoder.eval() if decoder is not None else None
        self.clip = clip.eval() if clip is not None else None  # stage 0's two towers: retrieval, zero-shot classification
        self.tokenizer = tokenizer
        self.config = config
        self.batch_size = batch_size
        self.precision = precision
        self.builder = SequenceBuilder.for_config(tokenizer, config)

    @property
    def device(self) -> torch.device:
        """Where the model runs; inputs are moved there."""
        return device_of(self.model)

    def to(self, device: str | torch.device) -> "NextMM":
        """Move the model, its decoder and its CLIP stage to `device` (a name is checked, device.pick_device)."""
        where = pick_device(device) if isinstance(device, str) else device
        for part in (self.model, self.decoder, self.clip):
            if part is not None:
                part.to(where)
        return self

    def _chunks(self, items):
        """Prompts (or a tensor of pixels) in slices of batch_size."""
        for start in range(0, len(items), self.batch_size):
            yield items[start : start + self.batch_size]

    def generate_ids(self, prompts: list[list[Segment]], max_new_tokens: int = 32,
                     answers: Sequence[str] | Sequence[Sequence[str]] | Constraint | None = None) -> list[list[int]]:
        """Greedy continuations; with `answers`, each is one of those strings (trie-constrained decoding), one
        of its own prompt's strings when given one list per prompt, or one that the given Constraint allows."""
        answers = self._constraint(answers, len(prompts))
        rows = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            allowed = answers.rows(start, stop) if isinstance(answers, RowAnswers) else answers
            rows += generate_ids(self.model, self.builder, prompts[start:stop], max_new_tokens, precision=self.precision, answers=allowed)
        return rows

    def _constraint(self, answers, prompts: int) -> Constraint | None:
        if answers is None or isinstance(answers, Constraint):
            return answers
        if not answers or isinstance(answers[0], str):
            return AnswerTrie.from_answers(self.tokenizer, answers)
        if len(answers) != prompts:
            raise AnswerError(f"{prompts} prompts were given {len(answers)} lists of allowed answers; give one list per prompt")
        return RowAnswers.from_answers(self.tokenizer, answers)

    def generate(self, prompts: list[list[Segment]], max_new_tokens: int = 32, answers: Sequence[str] | Sequence[Sequence[str]] | None = None) -> list[str]:
        return [self.tokenizer.decode(ids) for ids in self.generate_ids(prompts, max_new_tokens, answers)]

    def caption(self, images: Sequence[Visual], max_new_tokens: int = 32, answers: Sequence[str] | None = None) -> list[str]:
        """One caption per image (or per video, given as a list of frames); with `answers`, the one of those
        the model writes (zero-shot classification by caption)."""
        return self.generate([[_visual_segment(img)] for img in images], max_new_tokens, answers)

    def ask(self, images: Sequence[Visual], questions: Sequence[str], max_new_tokens: int = 8, answers: Sequence[str] | None = None) -> list[str]:
        """One answer per (image, question); with `answers`, always one of those (multiple choice, yes/no)."""
        if len(images) != len(questions):
            raise ValueError(f"ask() got {len(images)} images but {len(questions)} questions; give one question per image")
        return self.generate(
            [[_visual_segment(img), Text(vqa_prompt(q), target=False)] for img, q in zip(images, questions)], max_new_tokens, answers
        )

    def ground(self, images: Sequence[Picture], phrases: Sequence[str]) -> list[tuple[float, ...]]:
        """Visual grounding: the pixel box (x0, y0, x1, y1) of the region each phrase describes, from the four
        location tokens the model writes, its decoding constrained to boxes (constrained.BoxConstraint)."""
        if len(images) != len(phrases):
            raise ValueError(f"ground() got {len(images)} images but {len(phrases)} phrases; give one phrase per image")
        pictures = [_picture(img) for img in images]
        prompts = [[Image(p), Text(grounding_question(phrase), target=False)] for p, phrase in zip(pictures, phrases)]
        rows = self.generate_ids(prompts, answers=BoxConstraint(self.tokenizer))
        return [self.tokenizer.box_from_ids(ids, p.size) for ids, p in zip(rows, pictures)]

    def detect(self, images: Sequence[Picture], max_new_tokens: int = 48) -> list[list[tuple[str, tuple[float, ...]]]]:
        """Detection as an instruction: every object the model lists, as (phrase, pixel box) pairs; each phrase
        ends with its box (constrained.DetectionGrammar)."""
        pictures = [_picture(img) for img in images]
        prompts = [[Image(p), Text(DETECT_QUESTION, target=False)] for p in pictures]
        rows = self.generate_ids(prompts, answers=DetectionGrammar(self.tokenizer, max_new_tokens))
        return [self.tokenizer.phrases_with_boxes(ids, p.size) for ids, p in zip(rows, pictures)]

    def match(self, images: Sequence[Visual], texts: Sequence[str], calibrate: bool = False) -> list[bool]:
        """Image-text matching: whether the model says each text describes its image, yes or no: the sign of its
        yes-minus-no margin, as trie-constrained decoding to yes or no answers. With `calibrate` (contextual
        calibration, Zhao et al. 2021), less the margin it gives the same picture and an empty text: its bias
        for the question, if an empty text has nothing to judge. Demo-sized models put that bias anywhere, even
        while ranking the fitting texts first, and calibration then helps them much; but it can hurt a model
        that was right as it was, its empty text taken for a fit."""
        margins = self.match_margins(images, texts)
        if calibrate:
            margins = margins - self.match_margins(images, [""] * len(texts))
        return (margins > 0).tolist()

    def match_margins(self, images: Sequence[Visual], texts: Sequence[str]) -> torch.Tensor:
        """(n,) the yes-minus-no margin the model gives each text as a description of its image: `match` says yes
        where it is positive, and with `calibrate` first takes away the margin for an empty text ("")."""
        if len(images) != len(texts):
            raise ValueError(f"matching got {len(images)} images but {len(texts)} texts; give one text per image")
        return self._yes_margins([[_visual_segment(img), Text(matching_question(t), target=False)] for img, t in zip(images, texts)])

    def _yes_margins(self, prompts: list[list[Segment]]) -> torch.Tensor:
        """(prompts,) yes-minus-no score where the two answers' tokens first differ: what trie-constrained
        decoding to yes or no compares."""
        yes, no = (self.tokenizer.encode(answer) for answer in ("yes", "no"))
        shared = next(i for i, (a, b) in enumerate(zip(yes, no)) if a != b)
        scores = torch.cat([next_token_logits(self.model, self.builder, chunk, self.precision, then=yes[:shared]) for chunk in self._chunks(prompts)])
        return (scores[:, yes[shared]] - scores[:, no[shared]]).cpu()

    def complete(self, prompts: Sequence[Sequence[PromptPart]], max_new_tokens: int = 32, answers: Sequence[str] | None = None, **draw_options) -> list:
        """Continue interleaved prompts, e.g. [img1, "this is a blicket", img2, "this is a"]. Each result is
        the continuation's text, or, when the model opens an image with `[IMG]` and has a decoder, the list
        [text, image] (the image drawn as `draw` would, with `draw_options`). With `answers` the
        continuation is one of those strings."""
        segments = [to_segments(p) for p in prompts]
        rows = self.generate_ids(segments, max_new_tokens, answers)
        out: list = [self.tokenizer.decode(ids) for ids in rows]
        drawing = [i for i, ids in enumerate(rows) if ids and ids[-1] == self.tokenizer.img_id]
        if drawing and self.decoder is not None:
            written = [segments[i] + ([Text(out[i], target=False)] if out[i] else []) for i in drawing]
            images = self._draw(written, **draw_options)
            for i, image in zip(drawing, images):
                out[i] = [out[i], image]
        return out

    def chat(self, messages: Sequence[chatting.Message], max_new_tokens: int = 64, stream: bool = False,
             **draw_options) -> chatting.Reply | Iterator[chatting.Event]:
        """The model's reply to a conversation: messages `{"role": "system" | "user" | "assistant", "content": text or
        a list of text, pictures and videos}` (nextmm/chat.py), the last the user's. The reply is text, or a picture
        when the model draws one (rendered as `draw` would, with `draw_options`). With `stream`, an iterator of
        events as the reply is decoded: pieces of its text, its picture, and its end (the whole `Reply`)."""
        return self.replies([messages], max_new_tokens, stream=stream, **draw_options) if stream else \
            self.replies([messages], max_new_tokens, **draw_options)[0]

    def replies(self, conversations: Sequence[Sequence[chatting.Message]], max_new_tokens: int | Sequence[int] = 64, stream: bool = False,
                stop: MutableSet[int] | None = None, **draw_options) -> list[chatting.Reply] | Iterator[chatting.Event]:
        """Replies to many conversations, decoded together in batches; `max_new_tokens` one for all or one per
        conversation. With `stream`, the events of every reply as they happen (each names its conversation's
        `row`); rows that the caller adds to `stop` meanwhile end at once."""
        events = chatting.stream_replies(self, conversations, max_new_tokens, stop, **draw_options)
        if stream:
            return events
        replies: list = [None] * len(conversations)
        for event in events:
            if event.kind == "end":
                replies[event.row] = event.reply
        return replies

    def prompt_tokens(self, messages: Sequence[chatting.Message], max_new_tokens: int = 64) -> int:
        """The length of a conversation's prompt, checked: `chat.ContextFull` when the context leaves its reply no
        room; what a server checks before it batches a request."""
        length = chatting.prompt_length(self, chatting.to_conversation(messages))
        chatting.room(self, length, max_new_tokens)
        return length

    def draw(self, prompts: Sequence[str | Sequence[PromptPart]], guidance: float | None = None, steps: int | None = None,
             seed: int = 0, negative: str | None = None, candidates: int = 1, noises: Sequence[int] | None = None) -> list[PILImage.Image]:
        """One image per prompt. A prompt is text (`"a large red circle above a small blue square"`) or an
        interleaved list of text and pictures: in-context generation, blending (two images, no text), an
        edit (`[image, "make the red circle blue"]`). The LLM regresses the image's N embeddings and the
        visual decoder renders them with `steps` denoising steps and classifier-free `guidance` (the
        config's by default) against `negative` (the config's `decoder.negative` by default): "null", the
        decoder's learned no-condition, or "empty", Emu's choice, the embeddings regressed from an empty
        prompt in the same batch. Image k of a call depends only on its prompt, `seed` and k, not on the
        other prompts. With `candidates` K > 1 (text prompts only), each prompt is drawn from K noises, those
        `draw` would use with seeds `seed` to `seed + K - 1`, and the one the model itself judges to fit its
        text best is kept (its yes-minus-no margin, `match_margins`): on Shapes World, four candidates get
        both objects of a two-object prompt right markedly more often than a single drawing. `noises`, one number per
        prompt, gives each prompt the noise of that number instead (`noise_numbers`: image k of a call with `seed` has
        number seed x 1000003 + k), so that prompts drawn together (a server's batch) each get what they would alone."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if noises is not None and len(noises) != len(prompts):
            raise DrawError(f"{len(prompts)} prompts were given {len(noises)} noise numbers; give one per prompt")
        segments = []
        for k, prompt in enumerate(prompts):
            parts = to_segments(prompt)
            if not any(not isinstance(p, Text) or p.text.strip() for p in parts):
                raise DrawError(f"prompt {k + 1} is empty; give it text or pictures to draw from")
            segments.append(parts)
        return self._draw(segments, guidance, steps, seed, negative, candidates, noises)

    def reconstruct(self, images: Sequence[Picture], guidance: float | None = None, steps: int | None = None, seed: int = 0) -> list[PILImage.Image]:
        """Image -> its N visual embeddings -> image: what the decoder makes of what the model sees."""
        decoder = self._decoder()
        guidance, steps = self._sampling(guidance, steps)
        return self._render(decoder, self.embed_images(images), None, guidance, steps, noise_numbers(seed, len(images)), seen=True)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Picture]) -> torch.Tensor:
        """The (B, N, width) visual embeddings the vision tower and causal resampler make of each image."""
        pixels = to_pixels([_picture(img) for img in images], self.config.vision.image_size).to(self.device)
        return torch.cat([self.model.encode_images(chunk) for chunk in self._chunks(pixels)]).float().cpu()

    def regress(self, prompts: Sequence[str | Sequence[PromptPart]]) -> torch.Tensor:
        """The (B, N, width) visual embeddings the LLM regresses after each prompt and `[IMG]`: what `draw`
        renders, comparable with `embed_images` of a picture."""
        segments = [to_segments(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        return torch.cat([generate_visual(self.model, self.builder, chunk, precision=self.precision) for chunk in self._chunks(segments)]).cpu()

    def require_clip(self) -> CLIP:
        """The CLIP stage, or a clear error when the model directory has none."""
        if self.clip is None:
            raise ModelDirError("this model has no CLIP stage (clip.safetensors); models trained by this nextmm save it, so retrain or use a closed-set caption instead")
        return self.clip

    @torch.no_grad()
    def clip_image_features(self, images: Sequence[Picture]) -> torch.Tensor:
        """(B, d) unit-length CLIP image features."""
        clip = self.require_clip()
        pixels = to_pixels([_picture(img) for img in images], self.config.vision.image_size).to(device_of(clip))
        return torch.cat([clip.encode_image(chunk) for chunk in self._chunks(pixels)]).float().cpu()

    @torch.no_grad()
    def clip_text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, d) unit-length CLIP text features."""
        clip = self.require_clip()
        feats = [clip.encode_text(*(t.to(device_of(clip)) for t in text_batch(self.tokenizer, list(chunk), self.config.clip_text.max_len)))
                 for chunk in self._chunks(list(texts))]
        return torch.cat(feats).float().cpu()

    def classify(self, images: Sequence[Picture], labels: Sequence[str], template: str = "{}") -> list[str]:
        """Zero-shot classification with the CLIP stage: each image's label is the one whose prompt
        (`template` with the label in place of {}) has the most similar text feature."""
        scores = self.clip_image_features(images) @ self.clip_text_features(class_prompts(labels, template)).T
        return [labels[i] for i in scores.argmax(1).tolist()]

    def _decoder(self) -> VisualDecoder:
        if self.decoder is None:
            raise DrawError(
                "this model has no visual decoder (no decoder/ folder in its directory); train one with "
                "`nextmm train` (stage 2) or set decoder.pretrained to a diffusers directory with vae/ and unet/"
            )
        return self.decoder

    def _draw(self, segments: list[list[Segment]], guidance=None, steps=None, seed: int = 0, negative: str | None = None,
              candidates: int = 1, noises: Sequence[int] | None = None) -> list[PILImage.Image]:
        decoder = self._decoder()
        guidance, steps = self._sampling(guidance, steps)
        texts = self._judged_texts(segments, candidates)
        negative = self.config.decoder.negative if negative is None else negative
        if negative not in NEGATIVES:
            raise DrawError(f"negative is '{negative}'; use 'empty' (an empty prompt's embeddings) or 'null' (the decoder's no-condition)")
        empty = [[]] if negative == "empty" else []
        conditions, negative_embeddings = [], None
        for chunk in self._chunks(segments):
            regressed = generate_visual(self.model, self.builder, chunk + empty, precision=self.precision)
            if empty:  # Emu's negative: the empty prompt, regressed in the same batch (the same in every chunk)
                regressed, negative_embeddings = regressed[:-1], regressed[-1:]
            conditions.append(regressed)
        condition = torch.cat(conditions)  # regressed once: the candidates differ only in their noise
        noises = noise_numbers(seed, len(segments)) if noises is None else list(noises)
        drawn = [self._render(decoder, condition, negative_embeddings, guidance, steps, [n + k * NOISE_STRIDE for n in noises]) for k in range(candidates)]
        if candidates == 1:
            return drawn[0]
        margins = self.match_margins([image for row in drawn for image in row], texts * candidates).view(candidates, -1)
        return [drawn[k][i] for i, k in enumerate(margins.argmax(0).tolist())]

    @staticmethod
    def _judged_texts(segments: list[list[Segment]], candidates: int) -> list[str]:
        """The text each prompt's candidates are matched against, checked before any work."""
        if isinstance(candidates, bool) or not isinstance(candidates, int) or not 1 <= candidates <= MAX_CANDIDATES:
            raise DrawError(f"candidates {candidates} is out of range; use a whole number of drawings to choose among, from 1 to {MAX_CANDIDATES}")
        if candidates == 1:
            return []
        for k, parts in enumerate(segments):
            if not all(isinstance(p, Text) for p in parts):
                raise DrawError(f"prompt {k + 1} holds pictures, and candidates are chosen by how well they match a text; draw it with a single candidate")
        return [" ".join(p.text.strip() for p in parts) for parts in segments]

    def _sampling(self, guidance: float | None, steps: int | None) -> tuple[float, int]:
        """The sampling options, checked before any work: the config's when not given."""
        guidance = self.config.decoder.guidance if guidance is None else guidance
        steps = self.config.decoder.sample_steps if steps is None else steps
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 1.0 <= guidance <= MAX_GUIDANCE:
            raise DrawError(f"guidance {guidance} is out of range; use a value from 1 (none) to {MAX_GUIDANCE:g}")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise DrawError(f"steps {steps} is out of range; use a whole number of denoising steps from 1 to {MAX_STEPS}")
        return float(guidance), steps

    def _render(self, decoder: VisualDecoder, condition, negative, guidance, steps, noises: Sequence[int], seen: bool = False) -> list[PILImage.Image]:
        """One picture per condition, each from the noise its number in `noises` seeds (`noise_numbers`)."""
        images = []
        for start in range(0, len(condition), self.batch_size):
            part = condition[start : start + self.batch_size]
            generators = [torch.Generator().manual_seed(n) for n in noises[start : start + len(part)]]
            pixels = decoder.sample(part, negative=negative, guidance=guidance, steps=steps, generator=generators, seen=seen)
            images += to_pil(pixels)
        return images

    def save(self, path: str | Path, keep: tuple[str, ...] = ()) -> Path:
        """Write the model directory `path` whole (`keep`: entries of an existing one to carry over)."""

        def fill(tmp: Path) -> None:
            (tmp / "config.json").write_text(self.config.to_json())
            save_module(self.model, tmp / "model.safetensors")
            self.tokenizer.save(tmp / "tokenizer.json")
            if self.decoder is not None:
                self.decoder.save(tmp / "decoder")
            if self.clip is not None:
                save_module(self.clip, tmp / "clip.safetensors")

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomically(path, fill, keep=keep)


def build_model(config: Config, tokenizer: NextTokenizer) -> Emu:
    config.llm.vocab_size = tokenizer.vocab_size
    return Emu(config, tokenizer.image_id, tokenizer.bin_ids, tokenizer.special_ids)


def saved_config(model_dir: str | Path) -> Config:
    """The config of a saved model directory, checked to hold a whole model."""
    root = Path(model_dir)
    needed = ["config.json", "model.safetensors", "tokenizer.json"]
    missing = [name for name in needed if not (root / name).is_file()]
    if missing:
        raise ModelDirError(
            f"'{root}' is not a nextmm model directory (missing {', '.join(missing)}); "
            "point --model at the model/ folder that `nextmm train`, `nextmm demo` or `nextmm init` wrote"
        )
    return config_from_dict(json.loads((root / "config.json").read_text()))


def load(model_dir: str | Path, device: str = "auto", **kwargs) -> NextMM:
    """A saved model directory, on `device` (`auto`: a GPU when there is one, else the CPU). An adapter folder
    that `nextmm tune` wrote (tune.save=adapter) loads as the base model it names with the adapter folded in."""
    where = pick_device(device)  # checked before anything is read
    root = Path(model_dir)
    if (root / ADAPTER_CONFIG).is_file():
        base = adapter_base(root)
        check_base(root, base)
        m = load(base, device="cpu", **kwargs)
        apply_adapter(m.model, root)
        return m.to(where)
    config = saved_config(root)
    tokenizer = NextTokenizer.load(root / "tokenizer.json")
    model = _weights(build_model(config, tokenizer), root / "model.safetensors")
    clip = None
    if (root / "clip.safetensors").is_file():
        clip = _weights(CLIP(config.vision, config.clip_text, tokenizer.vocab_size), root / "clip.safetensors")
    return NextMM(model, tokenizer, config, decoder=_load_decoder(root, config), clip=clip, **kwargs).to(where)


# peft's adapter folder: adapter_config.json (naming the base model in base_model_name_or_path) and adapter_model.safetensors.
ADAPTER_CONFIG = "adapter_config.json"


def adapter_base(adapter: Path) -> Path:
    """The model directory an adapter folder was tuned from (a relative base_model_name_or_path is read from the
    adapter folder)."""
    try:
        named = json.loads((adapter / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (json.JSONDecodeError, AttributeError):
        raise ModelDirError(f"'{adapter / ADAPTER_CONFIG}' is not a JSON object as peft writes it; write the adapter again with `nextmm tune --adapter`") from None
    if not named:
        raise ModelDirError(f"the adapter in '{adapter}' names no base model (base_model_name_or_path in {ADAPTER_CONFIG}); set it to the model directory it was tuned from")
    base = adapter / named  # an absolute path stays as it is
    if not base.is_dir():
        raise ModelDirError(f"the adapter in '{adapter}' was tuned from '{named}', which is not a directory; put that model back or set "
                            f"base_model_name_or_path in {ADAPTER_CONFIG} to where it is")
    return base


BASE_FINGERPRINT = "nextmm_base.json"  # beside peft's files: the weights an adapter was tuned on
PIECE, PIECES = 1 << 16, 16


def weights_fingerprint(model_dir: Path) -> str:
    """A quick fingerprint of a model directory's weights (an adapter folder's own, in a chain of adapters): the file's
    size and 16 evenly spaced 64 KiB pieces of it, so that checking a large model does not read it twice. Training
    changes every tensor's bytes, so any retrained weights change it."""
    path = model_dir / ("adapter_model.safetensors" if (model_dir / ADAPTER_CONFIG).is_file() else "model.safetensors")
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        for k in range(PIECES):
            f.seek(k * max(size - PIECE, 0) // (PIECES - 1))
            digest.update(f.read(PIECE))
    return digest.hexdigest()


def record_base(adapter: Path, base: Path) -> None:
    """Write into the adapter folder which weights it was tuned on (`check_base` compares them when it is loaded)."""
    (adapter / BASE_FINGERPRINT).write_text(json.dumps({"base": str(base.resolve()), "weights": weights_fingerprint(base)}, indent=2) + "\n")


def check_base(adapter: Path, base: Path) -> None:
    """A clear error when the base model's weights changed since the adapter was tuned on them (an adapter from
    elsewhere, without the record, is taken as it is)."""
    record = adapter / BASE_FINGERPRINT
    if record.is_file() and json.loads(record.read_text()).get("weights") != weights_fingerprint(base):
        raise ModelDirError(f"the adapter in '{adapter}' was tuned on other weights than those now in '{base}' (the model there was "
                            "trained or replaced since); put that model back, or tune the adapter again from the model as it is now")


def apply_adapter(model: Emu, adapter: Path) -> Emu:
    """`model` (changed in place) with the peft adapter in the folder `adapter` folded into its weights."""
    from peft import PeftModel  # only adapters need it, and it imports transformers

    try:
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (ValueError, KeyError, RuntimeError) as err:
        raise ModelDirError(f"the adapter in '{adapter}' does not fit its base model ({str(err).strip().splitlines()[-1]}); tune it again from that model") from None


def from_checkpoint(checkpoint: str | Path, device: str = "auto") -> NextMM:
    """Stage 1's model as one of its training checkpoints holds it (`RUN/pretrain/checkpoints/step-N`, or the
    checkpoints folder for its latest), one file or the shards of a sharded run, with the run's config and tokenizer;
    without a decoder or CLIP tower. What a run stopped before its end leaves, as a model directory (`save`)."""
    path = Path(checkpoint)
    if (path / "latest").is_file():
        path = latest_checkpoint(path) or path
    run = path.parents[2] if len(path.parents) > 2 else path
    state = path / "state.json"
    if not state.is_file() or not (run / "config.json").is_file() or not (run / "tokenizer.json").is_file():
        raise ModelDirError(
            f"'{checkpoint}' is not a training checkpoint of a nextmm run; give RUN/pretrain/checkpoints/step-N (or "
            "RUN/pretrain/checkpoints) of a run folder that holds config.json and tokenizer.json"
        )
    stage = json.loads(state.read_text()).get("stage")
    if stage != "pretrain":
        raise ModelDirError(f"'{path}' is a checkpoint of stage '{stage}'; give one of stage 1's, in RUN/pretrain/checkpoints")
    config = config_from_dict(json.loads((run / "config.json").read_text()))
    tokenizer = NextTokenizer.load(run / "tokenizer.json")
    model = build_model(config, tokenizer)
    resume_weights(model, path)
    return NextMM(model, tokenizer, config).to(pick_device(device))


def _weights(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    try:
        load_module(module, path)
    except RuntimeError as err:  # torch reports missing, unexpected and mis-shaped weights this way
        raise ModelDirError(
            f"the weights in '{path}' do not fit the model its config.json describes "
            f"({str(err).splitlines()[-1].strip()}); the folder was changed by hand or saved by another nextmm, so retrain it"
        ) from None
    return module


def _load_decoder(root: Path, config: Config) -> VisualDecoder | None:
    width, n = config.visual_width, config.resampler.num_queries
    if (root / "decoder").is_dir():
        return VisualDecoder.load(root / "decoder", config.decoder, width, n)
    if config.decoder.pretrained:
        return VisualDecoder.from_pretrained_dir(config.decoder.pretrained, config.decoder, width, n)
    return None


NOISE_STRIDE = 1_000_003  # a call's images apart from the next seed's


def noise_numbers(seed: int, count: int) -> list[int]:
    """The numbers that seed the noise of a call's `count` pictures: picture k's is seed x NOISE_STRIDE + k."""
    return [seed * NOISE_STRIDE + k for k in range(count)]


def to_pil(pixels: torch.Tensor) -> list[PILImage.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB images."""
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [PILImage.fromarray(a) for a in array]

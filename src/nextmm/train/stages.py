"""The training pipeline: tokenizer -> stage 0 (CLIP image tower) -> stage 1 (Emu pretraining) -> stage 2
(visual decoder) -> model/.

Output layout of `nextmm train --out RUN`:
  RUN/config.json  RUN/tokenizer.json
  RUN/clip/      metrics.jsonl, checkpoints/, done.json
  RUN/pretrain/  metrics.jsonl, checkpoints/, done.json
  RUN/autoencoder/, RUN/diffusion/   stage 2, the visual decoder (train/decoder_stage.py)
  RUN/model/     the exported model (`nextmm.load(RUN/model)`)
With `resume=True` a finished stage is loaded rather than re-run and an unfinished one continues from
its last checkpoint; a stage built on one that trains in that run starts afresh (BUILT_ON).

Under torchrun (train/parallel.py) stages 1 and 2 train on every rank, each on its part of every global batch;
rank 0 alone makes the tokenizer, trains stage 0 and writes the run's files while the others wait.
"""

from __future__ import annotations

import itertools
import random
import zlib
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from nextmm.api import NextMM, build_model
from nextmm.config import Config, PretrainConfig
from nextmm.data.loader import LeftOut, MixedStream, Prefetcher, discover_sources
from nextmm.data.packing import Packer
from nextmm.data.sample import Image, Sample, Text
from nextmm.data.sequence import SequenceBuilder
from nextmm.data.shards import DataError, read_shards
from nextmm.data.transforms import to_pixels
from nextmm.device import on_gpu, pick_device
from nextmm.heads.location import location_token_loss
from nextmm.models.clip import CLIP, text_batch
from nextmm.models.emu import IGNORE, Emu
from nextmm.tokenizer import LOC_SPAN, NextTokenizer
from nextmm.models.decoder import VisualDecoder
from nextmm.precision import resolve
from nextmm.train.checkpoint import finished_stage, load_module, mark_stage_done, set_aside, stage_trains
from nextmm.train.decoder_stage import autoencoder_stage, build_decoder, diffusion_stage
from nextmm.train import parallel, parallelize, regression
from nextmm.train.loop import Trainer, param_groups
from nextmm.train.targets import VisualTarget, make_target
from nextmm.train.tower_cache import tower_cache

TOKENIZER_SAMPLES_PER_SOURCE = 20000


def train_tokenizer(sources: dict[str, Path], cfg: Config) -> NextTokenizer:
    def texts():
        for path in sources.values():
            for sample in itertools.islice(read_shards(path), TOKENIZER_SAMPLES_PER_SOURCE):
                # <loc> boxes become location tokens, not text: their digits would take BPE merges from words
                yield from (LOC_SPAN.sub(" ", seg.text) for seg in sample.segments if isinstance(seg, Text))

    return NextTokenizer.train(texts(), cfg.tokenizer.vocab_size, cfg.tokenizer.location_bins)


def image_text_pair(sample: Sample) -> tuple:
    """The first picture directly followed by target text: a caption pair for contrastive training."""
    if (pair := sample.captioned_image()) is not None:
        return pair
    raise DataError(f"sample '{sample.key}' has no image followed by its caption")


def hard_negative(text: str, batch: list[str], rng: random.Random, tries: int = 8) -> str:
    """The caption with one word replaced by the word at the same position in another caption of the
    batch, so the replacement is usually of the same kind (a shape for a shape, a colour for a colour)."""
    words = text.split()
    for _ in range(tries):
        other = rng.choice(batch).split()
        i = rng.randrange(len(words))
        if i < len(other) and other[i] != words[i]:
            return " ".join(words[:i] + [other[i]] + words[i + 1 :])
    return text  # nothing to swap: it counts as a match, not a negative


class ClipBatches:
    def __init__(self, tok: NextTokenizer, cfg: Config):
        self.tok, self.max_len, self.size = tok, cfg.clip_text.max_len, cfg.vision.image_size
        self.hard_negatives, self.max_words = cfg.clip.hard_negatives, cfg.clip.max_caption_words

    def item(self, sample: Sample) -> tuple:
        image, text = image_text_pair(sample)
        if self.max_words and len(text.split()) > self.max_words:
            raise LeftOut(f"its caption is longer than clip.max_caption_words={self.max_words} words")
        return image, text

    def collate(self, items: list[tuple]) -> dict[str, torch.Tensor]:
        texts = [text for _, text in items]
        if self.hard_negatives:
            # Seeded by the batch's own text, so a resumed run draws the same negatives.
            rng = random.Random(zlib.crc32("\n".join(texts).encode()))
            texts = texts + [hard_negative(t, texts, rng) for t in texts]
        ids, lengths = text_batch(self.tok, texts, self.max_len)
        width = ids.shape[1]
        valid = torch.arange(width).unsqueeze(0) < lengths[: len(items)].unsqueeze(1)
        return {"input_ids": ids, "lengths": lengths, "valid": valid, "pixels": to_pixels([i for i, _ in items], self.size)}


def clip_stage(cfg: Config, sources: dict[str, Path], out: Path, tok: NextTokenizer, resume: bool, device: torch.device | None = None,
               init: Path | None = None) -> CLIP:
    """Stage 0; its image tower starts from `init`'s (a model directory) when given, else from scratch."""
    torch.manual_seed(cfg.seed)
    clip = CLIP(cfg.vision, cfg.clip_text, tok.vocab_size)
    if init is not None:
        tower = {k.removeprefix("vision."): v for k, v in load_file(str(init / "model.safetensors")).items() if k.startswith("vision.")}
        clip.visual.load_state_dict(tower)
    clip.to(device or pick_device())
    stage_dir = out / "clip"
    if finished_stage(clip, stage_dir, resume, cfg.clip) is not None:
        return clip
    batches = ClipBatches(tok, cfg)
    pair_sources = {k: v for k, v in sources.items() if k == "caption"} or sources
    # A source of mixed kinds may hold samples with no caption pair: those are skipped and counted.
    stream = MixedStream(pair_sources, {}, batches.item, batches.collate, cfg.clip.batch_size, cfg.seed, unusable=(DataError,))
    trainer = Trainer("clip", clip, lambda b: clip.loss(b["pixels"], b["input_ids"], b["lengths"]), cfg.clip, stage_dir)
    mark_stage_done(stage_dir, trainer.run(Prefetcher(stream, pin=on_gpu(clip)), resume))
    return clip


def text_first(sample: Sample) -> Sample:
    """An image-caption pair read the other way round, for text-to-image: the caption is context (no
    cross-entropy) and the image after it is what the model regresses."""
    segments = sample.segments
    if len(segments) != 2 or not isinstance(segments[0], Image) or not isinstance(segments[1], Text):
        raise LeftOut("only image-caption pairs are read text-first (mix key text_to_image)")
    # The caption is context here, so it names no object for the pointer; the regions follow the image to segment 1.
    meta = {k: v for k, v in sample.meta.items() if k != "named_box"}
    meta["regions"] = [[1, phrase, box] for _, phrase, box in sample.meta.get("regions", [])]
    return Sample(sample.key, "text_to_image", [Text(segments[1].text, target=False), segments[0]], meta)


def text_to_image_view(sources: dict[str, Path]) -> dict[str, tuple[str, Callable[[Sample], Sample]]]:
    """The `text_to_image` source: the caption source (or a data directory's only source) read text-first."""
    base = "caption" if "caption" in sources else next(iter(sources)) if len(sources) == 1 else None
    return {"text_to_image": (base, text_first)} if base else {}


def pretrain_objective(model: Emu, p: PretrainConfig) -> tuple[VisualTarget | None, Callable, Callable]:
    """Stage 1's (EMA target or None, loss over a batch, backward of that loss) for these settings."""
    if p.target_ema > 0 and parallelize.sharded(p):
        raise parallel.ParallelError("pretrain.target_ema keeps a whole copy of the visual stack beside its shards; set it to 0 with pretrain.sharding=fsdp, or train with ddp")
    target = make_target(model, p.target_ema)
    gate = regression.VisualGate(model) if parallelize.sharded(p) and not p.regression_reaches_visual else None

    soft_locations = len(model.heads.location_ids) > 0 and p.location_sigma > 0
    text_loss = location_token_loss(model.heads.location_ids, p.location_sigma) if soft_locations else None

    def loss_fn(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        target_visual = target(batch["pixels"]) if target is not None and batch["pixels"].numel() else None
        extras = {"named_boxes": batch.get("named_boxes") if p.point_at_named else None, "claims": batch.get("claims"), "valid": batch.get("valid"),
                  "regions": (batch["region_ids"], batch["region_image"], batch["region_boxes"]) if p.point_at_objects and "region_ids" in batch else None}
        out = model.loss(batch["input_ids"], batch["labels"], batch["pixels"], p.regression_weight, target_visual, text_loss, p.pointer_weight, extras,
                         p.ce_chunk, batch.get("documents"), batch.get("drawn"))
        return out if parallel.world() == 1 else global_terms(out, batch)

    def global_terms(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's terms scaled so that DDP's average of their gradients over the ranks is the gradient of the
        global batch's loss, and their mean over the ranks its value. Emu's CE is a mean over the batch's labelled
        tokens and its L2 a mean over its regressed embeddings, so each rank's mean weighs by the rank's share of
        the global count, times the world size that DDP's average divides away. The heads' own terms (means over
        the boxes, regions or claims a head reads) are averaged over the ranks as they are: exact when the ranks
        hold equally many."""
        labelled = int((batch["labels"] != IGNORE).sum())
        regressed = len(model.regression_rows(batch["input_ids"], batch.get("drawn"))[0]) if "l2" in out else 0
        all_labelled, all_regressed = parallel.sum_over_ranks([labelled, regressed])
        ce_share = parallel.world() * labelled / all_labelled if all_labelled else 0.0
        out = {**out, "ce": out["ce"] * ce_share, "text": out["text"] + (ce_share - 1) * out["ce"]}
        out["loss"] = out["text"]
        if all_regressed:
            out["l2_weight"] = torch.tensor(p.regression_weight if all_labelled else 1.0)  # Emu.loss's rule, over the global batch
            if "l2" in out:
                out["l2"] = out["l2"] * (parallel.world() * regressed / all_regressed)
                out["loss"] = out["text"] + out["l2_weight"] * out["l2"]
        return out

    def backward(out: dict[str, torch.Tensor], scale: float) -> None:
        if p.regression_reaches_visual:
            (out["loss"] * scale).backward()
        elif gate is not None:
            regression.backward_in_passes(gate, out, scale)
        else:
            regression.backward(model, out, scale, one_pass=parallel.world() > 1)

    return target, loss_fn, backward


def part_rates(p: PretrainConfig) -> dict[str, float]:
    return {"vision.": p.vision_lr_scale, "ln_visual.": p.resampler_lr_scale, "resampler.": p.resampler_lr_scale,
            "visual_proj.": p.resampler_lr_scale, "llm.": p.llm_lr_scale}


def freeze_parts(model: Emu, p: PretrainConfig) -> None:
    """A part at rate 0 is frozen: no gradient is computed for it."""
    for prefix, scale in part_rates(p).items():
        if scale == 0:
            for name, param in model.named_parameters():
                if name.startswith(prefix):
                    param.requires_grad_(False)


def pretrain_groups(model: Emu, p: PretrainConfig) -> list[dict]:
    """Stage 1's optimizer groups: the vision tower slower, each part at its own rate, and the heads' parts at the
    rates they ask for (Head.rate_scales); the parts at rate 0 frozen."""
    freeze_parts(model, p)
    return param_groups(model, p.lr, p.weight_decay, {**model.heads.rate_scales(p, "heads."), **part_rates(p)})


def pretrain_stream(cfg: Config, tok: NextTokenizer, sources: dict[str, Path], batch_size: int, join_at: dict[str, int],
                    part: tuple[int, int] = (0, 1)) -> MixedStream:
    """Stage 1's batches: each sample encoded with what the heads learn from (its named box, regions, claim), packed
    into rows with `pretrain.pack_len`; `part` = (rank, world) keeps one rank's part of each."""
    p = cfg.pretrain
    builder = SequenceBuilder.for_config(tok, cfg)
    packer = Packer(builder, p.pack_len) if p.pack_len else None

    def encode(s: Sample):
        encoded = builder.encode(s.segments, named=s.named_box(), regions=s.regions() if p.point_at_objects else (), claim=s.claim())
        return packer.fit(encoded) if packer else encoded

    return MixedStream(sources, p.mix, encode, packer.collate if packer else builder.collate, batch_size, cfg.seed, join_at=join_at,
                       views=text_to_image_view(sources), part=part)


def pretrain_stage(cfg: Config, sources: dict[str, Path], out: Path, tok: NextTokenizer, clip: CLIP | None, resume: bool,
                   device: torch.device, init: Path | None = None) -> Emu:
    """Stage 1 from `init`'s weights (a model directory) or from scratch, the stage-0 CLIP tower taking the
    vision tower's place when there is one."""
    torch.manual_seed(cfg.seed + 1)
    model = build_model(cfg, tok)
    if init is not None:
        load_module(model, init / "model.safetensors")
    if clip is not None:
        model.vision.load_state_dict(clip.visual.state_dict())
    model.to(device)
    stage_dir = out / "pretrain"
    if finished_stage(model, stage_dir, resume, cfg.pretrain) is not None:
        return model
    p = cfg.pretrain
    stream = pretrain_stream(cfg, tok, sources, p.batch_size, p.join_at, parallel.part())
    target, loss_fn, backward = pretrain_objective(model, p)
    # Frozen before sharding, whose shards take their parameters' requires_grad; the optimizer groups after it, so
    # that they hold the shards.
    freeze_parts(model, p)
    objective = parallelize.prepare(model, loss_fn, p, parallel.broadcast(resolve(p.precision, device.type)))
    trainer = Trainer(
        "pretrain", model, loss_fn, p, stage_dir,
        groups=pretrain_groups(model, p),
        objective=objective,
        extra_modules={"target": target} if target is not None else None,
        after_step=(lambda: target.update(model)) if target is not None else None,
        backward=backward,
        # The location pointer's losses (its own box's L1 above all) make gradients several times the LLM's:
        # clipped together, they would shrink the LLM's steps, and its captions worsen.
        clip_apart=("heads.location.pointer.",),
    )
    with tower_cache(model.vision, p.tower_cache_gb):
        result = trainer.run(Prefetcher(stream, pin=on_gpu(model)), resume)
    if parallel.is_main():
        mark_stage_done(stage_dir, result)
    return parallelize.release(model, lambda: build_model(cfg, tok))


# The stages each stage is trained on top of. A stage that trains in a resumed run (it had not finished, or
# its limits were raised) changes what those after it were fitted to, so they start afresh rather than
# being loaded or continued: a UNet continued on a VAE trained further would denoise latents it never saw.
BUILT_ON = {"clip": (), "pretrain": ("clip",), "autoencoder": (), "diffusion": ("clip", "pretrain", "autoencoder")}


def resume_plan(cfg: Config, out: Path, resume: bool, stages: list[str]) -> dict[str, bool]:
    """Per stage, whether it may resume; a stage built on one that trains now is set aside (checkpoint.set_aside)."""
    plan: dict[str, bool] = {}
    training: list[str] = []
    for stage in stages:
        changed = [s for s in BUILT_ON[stage] if s in training]
        plan[stage] = resume and not changed
        if resume and changed:
            set_aside(out / stage, f"{' and '.join(changed)} trained further in this run")
        frozen = stage == "autoencoder" and bool(cfg.decoder.pretrained)  # a pretrained VAE is kept as it is
        if not frozen and stage_trains(out / stage, plan[stage], getattr(cfg, stage)):
            training.append(stage)
    return plan


def run_tokenizer(cfg: Config, sources: dict[str, Path], out: Path, resume: bool, init: Path | None) -> NextTokenizer:
    """The run's tokenizer, saved in it: the initial model's (a pretrained LLM's own), the resumed run's, or
    one trained on the data."""
    path = out / "tokenizer.json"
    if init is not None:
        tok = NextTokenizer.load(init / "tokenizer.json")
    elif resume and path.is_file():
        return NextTokenizer.load(path)
    else:
        tok = train_tokenizer(sources, cfg)
    tok.save(path)
    return tok


def run_decoder(cfg: Config, init: Path | None) -> VisualDecoder | None:
    """The decoder stage 2 trains: the initial model's, else one built from the config; None with
    diffusion.steps=0. Built first, so that a bad decoder.pretrained fails before stages 0 and 1."""
    if cfg.diffusion.steps <= 0:
        return None
    if init is not None and (init / "decoder").is_dir():
        return VisualDecoder.load(init / "decoder", cfg.decoder, cfg.visual_width, cfg.resampler.num_queries)
    return build_decoder(cfg)


def split_batches(cfg: Config, processes: int | None = None) -> None:
    """Check that every batch the processes share splits evenly among them (stage 0 runs on one process)."""
    parallel.local_batch(cfg.pretrain.batch_size, "pretrain.batch_size", processes)
    if cfg.diffusion.steps > 0:
        if not cfg.decoder.pretrained:
            parallel.local_batch(cfg.autoencoder.batch_size, "autoencoder.batch_size", processes)
        parallel.local_batch(cfg.diffusion.batch_size, "diffusion.batch_size", processes)


def train(cfg: Config, data_dir: str | Path, out_dir: str | Path, resume: bool = False, device: str = "auto",
          init: str | Path | None = None, timeout_s: float = parallel.DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Every stage on `device` (`auto`: the best one present, device.pick_device). With `init`, a model
    directory (`nextmm init`, an earlier run's model/), stage 1 starts from its weights, its
    tokenizer is the run's, and stage 0 runs only when clip.steps asks for it. Under torchrun, stages 1 and 2
    on every rank (parallel.py; a rank waits at most `timeout_s` for the others), the rest on rank 0."""
    with parallel.session(device, timeout_s) as where:
        return _train(cfg, data_dir, Path(out_dir), resume, where, Path(init) if init is not None else None)


def _train(cfg: Config, data_dir: str | Path, out: Path, resume: bool, where: torch.device, init: Path | None) -> dict[str, Any]:
    main = parallel.is_main()
    split_batches(cfg)
    sources = discover_sources(data_dir)

    def prepare() -> NextTokenizer:
        out.mkdir(parents=True, exist_ok=True)
        return run_tokenizer(cfg, sources, out, resume, init)

    tok = parallel.on_main(prepare)
    if tok is None:  # the other ranks read the one rank 0 saved
        tok = NextTokenizer.load(out / "tokenizer.json")
    cfg.llm.vocab_size = tok.vocab_size
    decoder = run_decoder(cfg, init)
    if decoder is not None:
        decoder.to(where)
    if main:
        (out / "config.json").write_text(cfg.to_json())
    stages = (["clip"] if cfg.clip.steps > 0 else []) + ["pretrain"] + (["autoencoder", "diffusion"] if cfg.diffusion.steps > 0 else [])
    plan = parallel.broadcast(resume_plan(cfg, out, resume, stages) if main else None)  # it moves folders: rank 0's alone
    clip = None
    if "clip" in plan:
        clip = parallel.on_main(lambda: clip_stage(cfg, sources, out, tok, plan["clip"], where, init))
        if not main:  # the tower rank 0 has just trained, from its checkpoint
            clip = clip_stage(cfg, sources, out, tok, True, where, init)
    model = pretrain_stage(cfg, sources, out, tok, clip, plan["pretrain"], where, init)
    if decoder is not None:
        autoencoder_stage(cfg, sources, out, decoder, plan["autoencoder"])
        diffusion_stage(cfg, sources, out, decoder, model, clip, tok, plan["diffusion"])
    parallel.on_main(lambda: NextMM(model, tok, cfg, decoder=decoder, clip=clip).save(out / "model"))
    return {"model": str(out / "model"), "run": str(out), "sources": {k: str(v) for k, v in sources.items()}}

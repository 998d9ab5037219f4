"""Stage 2, the visual decoder: its autoencoder on pixels, then its UNet on the frozen visual embeddings; under
torchrun each rank trains on its part of every batch (train/parallel.py).

  RUN/autoencoder/  metrics.jsonl, checkpoints/, done.json   (skipped when decoder.pretrained gives a VAE)
  RUN/diffusion/    metrics.jsonl, checkpoints/, done.json
The UNet learns to rebuild each image from the embeddings that stage 1's frozen vision tower and causal
resampler make of that same image, as in Emu, and (a share `decoder.regressed_condition` of captioned
images) from what the frozen LLM regresses from the image's caption: what it is given at generation time.
With `decoder.semantic_token`, the UNet's extra token's read-outs are fitted first, on captioned pictures of
the stream and the CLIP stage's features of them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from nextmm.config import MIN_SEMANTIC_PICTURES, Config
from nextmm.data.loader import MixedStream, Prefetcher
from nextmm.data.sample import Image, Sample, Text, Video
from nextmm.data.sequence import SequenceBuilder
from nextmm.data.shards import DataError
from nextmm.data.transforms import to_pixels
from nextmm.device import device_of, on_gpu
from nextmm.generate import generate_visual
from nextmm.models.clip import CLIP
from nextmm.models.decoder import VisualDecoder
from nextmm.models.emu import Emu
from nextmm.tokenizer import NextTokenizer
from nextmm.train import parallel
from nextmm.train.checkpoint import finished_stage, mark_stage_done
from nextmm.train.loop import Trainer, param_groups

CALIBRATION_BATCHES = 4  # batches whose latents set the VAE's scaling factor after its training


def build_decoder(cfg: Config) -> VisualDecoder:
    torch.manual_seed(cfg.seed + 2)
    width, n = cfg.visual_width, cfg.resampler.num_queries
    semantic = cfg.clip_text.embed_dim if cfg.decoder.semantic_token else 0
    grid = cfg.decoder.semantic_grid
    if cfg.decoder.pretrained:
        decoder = VisualDecoder.from_pretrained_dir(cfg.decoder.pretrained, cfg.decoder, width, n, semantic, grid)
        cfg.decoder.image_size = decoder.image_size  # the UNet's own size: the stage trains on images of it
        return decoder
    return VisualDecoder(cfg.decoder, width, n, semantic_width=semantic, semantic_grid=grid)


def first_picture(sample: Sample):
    """Any picture trains the decoder: the first image, or a video's first frame."""
    for seg in sample.segments:
        if isinstance(seg, Image):
            return seg.image
        if isinstance(seg, Video) and seg.frames:
            return seg.frames[0]
    raise DataError(f"sample '{sample.key}' has no picture")


def picture_and_caption(sample: Sample) -> tuple:
    """The first captioned image and its caption, or else the first picture and None."""
    return sample.captioned_image() or (first_picture(sample), None)


def picture_stream(cfg: Config, sources: dict[str, Path], batch_size: int, seed: int, part: tuple[int, int] = (0, 1),
                   pin: bool = False) -> Prefetcher:
    """Batches of pictures (and their captions, where they have one); `part` = (rank, world) keeps one rank's part of
    each; `pin` for a GPU (Prefetcher)."""
    vision_size, decoder_size = cfg.vision.image_size, cfg.decoder.image_size

    def collate(items: list[tuple]) -> dict:
        images = [image for image, _ in items]
        return {
            "pixels": to_pixels(images, vision_size), "target": to_pixels(images, decoder_size),
            "valid": torch.ones(len(images), 1, dtype=torch.bool), "captions": [caption for _, caption in items],
        }

    # Captions are Shapes World's plain scenes; a user's data directory may hold any kinds.
    picked = {k: v for k, v in sources.items() if k == "caption"} or sources
    stream = MixedStream(picked, {}, picture_and_caption, collate, batch_size, seed, unusable=(DataError,), part=part)
    return Prefetcher(stream, pin=pin)


def autoencoder_stage(cfg: Config, sources: dict[str, Path], out: Path, decoder: VisualDecoder, resume: bool) -> None:
    stage_dir = out / "autoencoder"
    if cfg.decoder.pretrained:
        return
    if (done := finished_stage(decoder.vae, stage_dir, resume, cfg.autoencoder)) is not None:
        decoder.vae.register_to_config(scaling_factor=done["latent_scale"])
        return
    stream = picture_stream(cfg, sources, cfg.autoencoder.batch_size, cfg.seed + 2, parallel.part(), on_gpu(decoder))
    trainer = Trainer("autoencoder", decoder.vae, lambda b: decoder.autoencoder_loss(b["target"]), cfg.autoencoder, stage_dir)
    result = trainer.run(stream, resume)
    # A VAE trained from scratch has latents of no particular scale; diffusion assumes about unit variance.
    calibration = torch.cat([stream.next_batch()["target"] for _ in range(CALIBRATION_BATCHES)]).to(device_of(decoder.vae))
    scale = parallel.broadcast(decoder.calibrate_latent_scale(calibration))  # rank 0's pictures set it for all
    decoder.vae.register_to_config(scaling_factor=scale)
    tqdm.write(f"[autoencoder] latent scaling factor {scale:.4f}")
    if parallel.is_main():
        mark_stage_done(stage_dir, result, latent_scale=scale)


def regress_captions(model: Emu, builder: SequenceBuilder, captions: list[str], precision: str) -> torch.Tensor:
    """The (B, N, width) embeddings the frozen LLM regresses from each caption alone."""
    return generate_visual(model, builder, [[Text(caption, target=False)] for caption in captions], precision=precision)


def training_condition(model: Emu, builder: SequenceBuilder, batch: dict, share: float, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's condition for each image of a batch, and which rows were seen: the visual embeddings of
    the image itself or, for a random `share` of the captioned ones, the embeddings the LLM regresses from
    the caption alone. Those are not the image's: the caption does not say where an object lies, so L2
    regression gives about the average over places, and a decoder that only ever sees real embeddings draws
    blobs from it; trained on both, it learns to draw some place for what the
    caption names."""
    captions, pixels = batch["captions"], batch["pixels"]
    picked = [i for i, caption in enumerate(captions) if caption is not None and torch.rand(()) < share]
    kept = sorted(set(range(len(captions))) - set(picked))  # only these images are encoded
    condition = torch.empty(len(captions), model.num_queries, model.cfg.visual_width, device=pixels.device)
    with torch.no_grad():
        if kept:
            condition[kept] = model.encode_images(pixels[kept]).float()
        if picked:
            condition[picked] = regress_captions(model, builder, [captions[i] for i in picked], precision)
    seen = torch.ones(len(captions), dtype=torch.bool, device=pixels.device)
    seen[picked] = False
    return condition, seen


@torch.no_grad()
def fit_semantic_readouts(
    cfg: Config, sources: dict[str, Path], decoder: VisualDecoder, model: Emu, clip: CLIP, builder: SequenceBuilder
) -> None:
    """Fit the decoder's semantic read-outs on `decoder.semantic_pictures` captioned pictures of the stream:
    their regressions from the captions and their seen embeddings, onto the CLIP stage's features of them."""
    wanted = cfg.decoder.semantic_pictures
    stream = picture_stream(cfg, sources, cfg.diffusion.batch_size, cfg.seed + 4)
    pixels, captions, looked = [], [], 0
    for _ in range(4 * wanted // cfg.diffusion.batch_size + 1):  # a bounded search: data may hold few captions
        batch = stream.next_batch()
        looked += len(batch["captions"])
        rows = [i for i, caption in enumerate(batch["captions"]) if caption is not None]
        pixels.append(batch["pixels"][rows])
        captions += [batch["captions"][i] for i in rows]
        if len(captions) >= wanted:
            break
    if len(captions) < MIN_SEMANTIC_PICTURES:
        raise DataError(
            f"the data has {len(captions)} captioned pictures among the first {looked} looked at, too few to fit the "
            "decoder's semantic token; add captioned images or set decoder.semantic_token=false"
        )
    pixels, captions = torch.cat(pixels)[:wanted].to(device_of(model)), captions[:wanted]
    seen, regressed, features = [], [], []
    for start in range(0, len(captions), cfg.diffusion.batch_size):
        part = slice(start, start + cfg.diffusion.batch_size)
        seen.append(model.encode_images(pixels[part]).float())
        regressed.append(regress_captions(model, builder, captions[part], cfg.diffusion.precision))
        features.append(clip.encode_image_cells(pixels[part], decoder.semantic_grid).float())
    decoder.fit_readouts(torch.cat(regressed), torch.cat(seen), torch.cat(features))
    tqdm.write(f"[diffusion] semantic token's read-outs fitted on {len(captions)} captioned pictures")


def diffusion_stage(
    cfg: Config, sources: dict[str, Path], out: Path, decoder: VisualDecoder, model: Emu, clip: CLIP | None, tok: NextTokenizer, resume: bool
) -> None:
    stage_dir = out / "diffusion"
    if finished_stage(decoder, stage_dir, resume, cfg.diffusion) is not None:
        return
    decoder.vae.requires_grad_(False)  # frozen: kept out of the optimizer
    model.eval()
    builder = SequenceBuilder.for_config(tok, cfg)
    if decoder.semantic_width:  # before any checkpoint is resumed, which then brings back the same fit
        if clip is None:
            raise DataError("decoder.semantic_token reads the CLIP stage's features, and this run trains no CLIP stage; set decoder.semantic_token=false")
        fit_semantic_readouts(cfg, sources, decoder, model, clip.eval(), builder)

    def loss_fn(batch: dict) -> dict[str, torch.Tensor]:
        condition, seen = training_condition(model, builder, batch, cfg.decoder.regressed_condition, cfg.diffusion.precision)
        return decoder.diffusion_loss(batch["target"], condition, seen)

    d = cfg.diffusion
    stream = picture_stream(cfg, sources, d.batch_size, cfg.seed + 3, parallel.part(), on_gpu(decoder))
    trainer = Trainer("diffusion", decoder, loss_fn, d, stage_dir, groups=param_groups(decoder, d.lr, d.weight_decay))
    result = trainer.run(stream, resume)
    if parallel.is_main():
        mark_stage_done(stage_dir, result)

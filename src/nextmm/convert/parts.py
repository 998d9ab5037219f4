"""A nextmm model built from pretrained parts in local folders: an LLM (a Hugging Face causal LM directory),
a vision tower (a Hugging Face CLIP or SigLIP vision directory, or an EVA-CLIP state dict) and, optionally, a
Stable Diffusion decoder (a diffusers directory with vae/ and unet/). The causal transformer, the projection
and the regression head start fresh; the LLM's vocabulary grows by Emu's tokens (`[IMG]`, `[/IMG]`,
`<image>`, ...), their rows the mean of the old ones. The result is an ordinary model directory that
`nextmm.load` reads and `nextmm train --init` trains from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from nextmm.config import Config, apply_overrides, make_config
from nextmm.convert.common import ConvertError, copy_into, read_json, read_state_dict
from nextmm.convert.eva_clip import load_eva_vision
from nextmm.convert.hf_llm import grow_vocabulary, llm_config_from_hf, llm_state_from_hf
from nextmm.convert.hf_vision import load_hf_vision
from nextmm.models.decoder import VisualDecoder
from nextmm.tokenizer import NextTokenizer

BASE_PRESET = "emu-14b"  # the paper's composition: T5-style causal transformer, regression in the LLM's width


def load_tower(path: str | Path, feature_layer: int | None = None):
    """(tower, VisionConfig) from a Hugging Face vision directory (config.json) or an EVA-CLIP state dict.
    Emu reads EVA's last block before its final norm; a CLIP or SigLIP tower is read, as LLaVA reads it, at
    its penultimate block. Either way Emu's own LayerNorm (`emu.visual_norm`) follows."""
    root = Path(path)
    if (root / "config.json").is_file():
        return load_hf_vision(root, feature_layer=-2 if feature_layer is None else feature_layer, final_norm=False)
    if feature_layer not in (None, -1):
        raise ConvertError(f"--vision-layer {feature_layer} is for Hugging Face towers; an EVA-CLIP tower is read at its last block")
    tower = load_eva_vision(root)
    return tower, tower.cfg


def pretrained_stages(cfg: Config, decoder: bool) -> Config:
    """The training stages for a model of pretrained parts: no stage 0 (it trains a tower from scratch), no
    semantic token (it reads stage 0's features), and stage 2 only with a pretrained decoder; overrides
    applied after this may ask for either."""
    cfg.clip.steps = 0
    cfg.decoder.semantic_token = False
    if not decoder:
        cfg.diffusion.steps = 0
    return cfg


def config_from_parts(llm_cfg, vision_cfg, preset: str, overrides: Sequence[str], decoder: bool) -> Config:
    """The preset's causal transformer, composition, heads and training settings around the parts' own configs."""
    cfg = make_config(preset)
    cfg.llm, cfg.vision = llm_cfg, vision_cfg
    cfg.emu.visual_norm = not vision_cfg.final_norm
    return apply_overrides(pretrained_stages(cfg, decoder), list(overrides))


def init_model(llm_dir: str | Path, vision_dir: str | Path, out: str | Path, decoder_dir: str | Path | None = None,
               preset: str = BASE_PRESET, overrides: Sequence[str] = (), vision_layer: int | None = None) -> Path:
    """Build and save a model directory from the parts; nothing is written unless every part loads. The
    LLM's checkpoint is copied straight into the built model, so memory holds it and the model, not a
    separate LLM as well."""
    from nextmm.api import NextMM
    from nextmm.models.emu import Emu

    llm_root = Path(llm_dir)
    tower, vision_cfg = load_tower(vision_dir, vision_layer)
    llm_cfg = llm_config_from_hf(read_json(llm_root / "config.json"))
    cfg = config_from_parts(llm_cfg, vision_cfg, preset, overrides, decoder_dir is not None)
    # its ids follow config.json's vocab_size rows (from_llm checks), which copy_into checks the weights against
    tokenizer, added = NextTokenizer.from_llm(llm_root, cfg.tokenizer.location_bins)
    decoder = None
    if decoder_dir is not None:
        cfg.decoder.pretrained = str(decoder_dir)
        decoder = VisualDecoder.from_pretrained_dir(decoder_dir, cfg.decoder, cfg.visual_width, cfg.resampler.num_queries)
    torch.manual_seed(cfg.seed)
    model = Emu(cfg, tokenizer.image_id, tokenizer.bin_ids, tokenizer.special_ids)
    copy_into(model.llm, llm_state_from_hf(read_state_dict(llm_root), cfg.llm), str(llm_root))
    grow_vocabulary(model.llm, added)  # cfg.llm.vocab_size follows
    model.vision.load_state_dict(tower.state_dict())
    del tower  # the model holds its own copy; memory need not hold both while the directory is written
    cfg.tokenizer.vocab_size = cfg.llm.vocab_size
    return NextMM(model, tokenizer, cfg, decoder=decoder).save(out)


def llm_architecture(cfg) -> str:
    """The Hugging Face architecture that computes what an LLMConfig does (the one it was most likely read from)."""
    if cfg.qk_norm:
        return "Qwen3ForCausalLM"
    if cfg.qkv_bias:
        return "Qwen2ForCausalLM"
    if cfg.sliding_window:
        return "MistralForCausalLM"
    return "LlamaForCausalLM"


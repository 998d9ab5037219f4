"""HF CLIPVisionModel and SiglipVisionModel checkpoints (or the vision half of a CLIPModel or SiglipModel)
onto nextmm's vision tower (models/vision.py): the config from config.json and preprocessor_config.json,
the weights renamed, the blocks after the read layer left out.

    tower, cfg = load_hf_vision("path/to/clip-vit-large-patch14", feature_layer=-2)   # LLaVA's read
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping

import torch

from nextmm.config import VisionConfig
from nextmm.convert.common import ConvertError, copy_into, read_json, read_state_dict
from nextmm.models.vision import VisionTransformer, blocks_read

# What `model_type` says -> the tower's family. The full models hold their tower under `vision_config`.
MODEL_TYPES = {"clip_vision_model": "clip", "clip": "clip", "siglip_vision_model": "siglip", "siglip": "siglip"}
# HF's defaults, for the keys that a config.json saved by older transformers (differences only) leaves out.
HF_DEFAULTS = {
    "clip": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3},
    "siglip": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "num_channels": 3},
}
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
# The normalisation each family trained with, where no preprocessor_config.json says otherwise. OpenAI's
# CLIP values serve EVA-CLIP too.
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
FAMILY_MEAN_STD = {"clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), "siglip": ([0.5] * 3, [0.5] * 3)}

_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_BLOCK_NAMES = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.out", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2"}
_TOP_NAMES = {"embeddings.patch_embedding": "patch_embed", "pre_layrnorm": "pre_norm", "post_layernorm": "norm"}
# Parts nextmm's tower does not have: the SigLIP attention-pool head, and position ids older transformers saved.
_UNUSED = ("head.", "embeddings.position_ids")


def vision_config_from_hf(hf_config: dict, *, preprocessor: dict | None = None, feature_layer: int = -1, final_norm: bool = False) -> VisionConfig:
    """The VisionConfig of an HF vision tower's config.json (a CLIPModel's or SiglipModel's is read through its
    `vision_config`); mean and std from its preprocessor_config.json when given, else the family's own.
    `feature_layer` and `final_norm` choose the tokens read (VisionConfig)."""
    model_type = hf_config.get("model_type")
    kind = MODEL_TYPES.get(model_type)
    if kind is None:
        found = f"config.json's model type '{model_type}' is not a vision tower nextmm reads" if model_type else "config.json names no model_type, so it is not a Hugging Face vision tower's"
        raise ConvertError(f"{found}; give one of: {', '.join(MODEL_TYPES)} (CLIPVisionModel, CLIPModel, SiglipVisionModel, SiglipModel)")
    tower = (hf_config.get("vision_config") or {}) if model_type in ("clip", "siglip") else hf_config
    values = {**HF_DEFAULTS[kind], **tower}
    act = HF_ACTIVATIONS.get(values["hidden_act"])
    if act is None:
        raise ConvertError(f"config.json's hidden_act '{values['hidden_act']}' is not one nextmm's tower has; it has {', '.join(HF_ACTIVATIONS)}")
    if values["num_channels"] != 3:
        raise ConvertError(f"config.json's num_channels is {values['num_channels']}; nextmm's tower reads RGB images (3 channels)")
    mean, std = FAMILY_MEAN_STD[kind]
    if preprocessor:
        mean, std = preprocessor.get("image_mean", mean), preprocessor.get("image_std", std)
    width = values["hidden_size"]
    return VisionConfig(
        image_size=values["image_size"], patch_size=values["patch_size"], width=width, layers=values["num_hidden_layers"],
        heads=values["num_attention_heads"], mlp_ratio=values["intermediate_size"] / width, stem="patch", kind=kind,
        feature_layer=feature_layer, final_norm=final_norm, eps=values["layer_norm_eps"], act=act, mean=list(mean), std=list(std),
    )


def vision_state_from_hf(state: Mapping[str, torch.Tensor], cfg: VisionConfig, source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """An HF CLIP or SigLIP vision state dict (keys with or without `vision_model.`; a full model's other
    parts are left out) in nextmm's tower names, fitted to `cfg` (`fit_to_tower`). A key nextmm does not know
    keeps its name, so that `copy_into` lists it as unexpected."""
    prefix = "vision_model."
    if any(key.startswith(prefix) for key in state):
        state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    mapped: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}  # (layer, weight or bias) -> q, k, v: (key, tensor)
    for key, value in state.items():
        if key.startswith(_UNUSED):
            continue
        layer = _LAYER.fullmatch(key)
        if layer:
            index, rest = int(layer[1]), layer[2]
            projection = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if projection:
                qkv.setdefault((index, projection[2]), {})[projection[1]] = (key, value)
                continue
            module, _, leaf = rest.rpartition(".")
            mapped[f"blocks.{index}.{_BLOCK_NAMES[module]}.{leaf}" if module in _BLOCK_NAMES else key] = value
        elif key == "embeddings.class_embedding":
            mapped["cls"] = value.reshape(1, 1, -1)
        elif key == "embeddings.position_embedding.weight":
            mapped["pos"] = value.unsqueeze(0)
        else:
            module, _, leaf = key.rpartition(".")
            mapped[f"{_TOP_NAMES[module]}.{leaf}" if module in _TOP_NAMES else key] = value
    for (index, leaf), parts in qkv.items():
        if parts.keys() == {"q", "k", "v"}:
            mapped[f"blocks.{index}.attn.qkv.{leaf}"] = torch.cat([parts[p][1] for p in "qkv"])
        else:  # an incomplete triple keeps its names, and copy_into names what is missing
            mapped.update(dict(parts.values()))
    return fit_to_tower(mapped, cfg, source)


def fit_to_tower(state: dict[str, torch.Tensor], cfg: VisionConfig, source: str) -> dict[str, torch.Tensor]:
    """A state dict in nextmm's tower names, less what a tower built from `cfg` leaves out: the blocks after
    `feature_layer` and, without `final_norm`, the final norm. Position embeddings made for another image
    size are an error that names both sizes."""
    built = blocks_read(cfg)
    kept = {}
    for key, value in state.items():
        block = re.match(r"blocks\.(\d+)\.", key)
        if (block and built <= int(block[1]) < cfg.layers) or (key.startswith("norm.") and not cfg.final_norm):
            continue
        kept[key] = value
    count = kept["pos"].shape[-2] if "pos" in kept else cfg.num_tokens
    if count != cfg.num_tokens:
        side = math.isqrt(max(count - cfg.cls_tokens, 0))
        if side * side != count - cfg.cls_tokens:
            raise ConvertError(f"{source} has {count} position embeddings where a {cfg.image_size} px config with patch {cfg.patch_size} has {cfg.num_tokens}; check that the config matches the checkpoint")
        raise ConvertError(
            f"{source} has position embeddings for {side * cfg.patch_size} px images but the config asks for {cfg.image_size} px; "
            f"set image_size to {side * cfg.patch_size}, the size the tower was trained at"
        )
    return kept


def load_hf_vision(path: str | Path, feature_layer: int = -1, final_norm: bool = False) -> tuple[VisionTransformer, VisionConfig]:
    """A local HF CLIP or SigLIP directory (config.json, weights, optionally preprocessor_config.json) ->
    (nextmm's tower with its weights, its VisionConfig). Nothing is downloaded."""
    path = Path(path)
    if not path.is_dir():
        raise ConvertError(f"'{path}' is not a directory; give the local folder of an HF CLIP or SigLIP model")
    processor = path / "preprocessor_config.json"
    cfg = vision_config_from_hf(
        read_json(path / "config.json"), preprocessor=read_json(processor) if processor.is_file() else None,
        feature_layer=feature_layer, final_norm=final_norm,
    )
    tower = VisionTransformer(cfg)
    copy_into(tower, vision_state_from_hf(read_state_dict(path), cfg, source=f"'{path}'"), str(path))
    return tower, cfg


"""EVA-CLIP's vision tower (EVA01-g-14 is Emu's) onto nextmm's tower (models/vision.py, kind `eva`), from the
state dict of EVA's own repository or open_clip: keys under `visual.` (the rest of a CLIP checkpoint is left
out), optionally under open_clip's timm `trunk.`, or bare as Emu's converter passes them:

    patch_embed.proj.{weight,bias}  cls_token  pos_embed  norm.{weight,bias}  head.*
    blocks.N.{norm1,norm2}.{weight,bias}  blocks.N.attn.qkv.weight  blocks.N.attn.{q_bias,v_bias}
    blocks.N.attn.proj.{weight,bias}  blocks.N.mlp.{fc1,fc2}.{weight,bias}

EVA01 is a plain pre-norm ViT: linear patch embedding, CLS, absolute position embeddings, no pre-norm,
GELU MLP, LayerNorm eps 1e-6, no RoPE and no sub-LN; its fused qkv has q and v biases but no k bias.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from nextmm.config import VisionConfig
from nextmm.convert.common import copy_into, read_state_dict
from nextmm.convert.hf_vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, fit_to_tower
from nextmm.models.vision import VisionTransformer

_BLOCK_NAMES = {"attn.proj": "attn.out", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2"}
_TOP_NAMES = {"patch_embed.proj.weight": "patch_embed.weight", "patch_embed.proj.bias": "patch_embed.bias", "cls_token": "cls", "pos_embed": "pos"}
# The CLIP projection head, and the norm of mean-pooled towers: nextmm's tower returns tokens, not a pooled vector.
_UNUSED = ("head.", "fc_norm.")


def eva_vision_config(
    image_size: int = 224, patch_size: int = 14, width: int = 1408, layers: int = 40, heads: int = 16, mlp_hidden: int = 6144,
    feature_layer: int = -1, final_norm: bool = False,
) -> VisionConfig:
    """An EVA01 tower's VisionConfig; the defaults are EVA01-g-14 read as Emu reads it: every block's output,
    all 257 tokens, before the tower's final norm (Emu applies its own `ln_visual`)."""
    return VisionConfig(
        image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=heads, mlp_ratio=mlp_hidden / width,
        stem="patch", kind="eva", feature_layer=feature_layer, final_norm=final_norm, eps=1e-6, act="gelu",
        mean=list(OPENAI_CLIP_MEAN), std=list(OPENAI_CLIP_STD),
    )


def eva_state_from_open_clip(state: Mapping[str, torch.Tensor], cfg: VisionConfig, source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """An EVA-CLIP visual state dict in nextmm's tower names, fitted to `cfg` (hf_vision.fit_to_tower). A key
    nextmm does not know (RoPE, layer scale, relative position bias: not EVA01) keeps its name, so that
    `copy_into` lists it as unexpected."""
    for prefix in ("visual.", "trunk."):
        if any(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    mapped: dict[str, torch.Tensor] = {}
    biases: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith(_UNUSED):
            continue
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(\w+)", key)
        if block and block[2] == "attn" and block[3] in ("q_bias", "k_bias", "v_bias"):
            biases.setdefault(int(block[1]), {})[block[3][0]] = value
        elif block and block[2] in _BLOCK_NAMES:
            mapped[f"blocks.{block[1]}.{_BLOCK_NAMES[block[2]]}.{block[3]}"] = value
        else:
            mapped[_TOP_NAMES.get(key, key)] = value
    for index, parts in biases.items():
        if "q" in parts and "v" in parts:
            # EVA has no key bias (timm keeps a zero buffer); a zero one changes nothing (models/vision.Attention)
            mapped[f"blocks.{index}.attn.qkv.bias"] = torch.cat([parts["q"], parts.get("k", torch.zeros_like(parts["q"])), parts["v"]])
        else:  # a q bias without its v bias, or the reverse: copy_into names the incomplete key
            mapped.update({f"blocks.{index}.attn.{p}_bias": b for p, b in parts.items()})
    return fit_to_tower(mapped, cfg, source)


def load_eva_vision(path: str | Path, cfg: VisionConfig | None = None) -> VisionTransformer:
    """A local EVA-CLIP checkpoint (a file, or a directory read by convert/common.read_state_dict) -> nextmm's
    tower with its weights; `cfg` defaults to EVA01-g-14 as Emu reads it (`eva_vision_config()`)."""
    cfg = cfg or eva_vision_config()
    tower = VisionTransformer(cfg)
    copy_into(tower, eva_state_from_open_clip(read_state_dict(path), cfg, source=f"'{path}'"), str(path))
    return tower

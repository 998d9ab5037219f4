"""The official Emu1 checkpoint (baaivision/Emu, `Emu1/`) under nextmm's names, part by part.

Its causal transformer ("cformer") is a T5 decoder stack, `cformer.cformer.*`, fed the learned
`cformer.causal_tokens` (1, N, 768); it maps onto `models.resampler_t5.T5Resampler`. Its
`cformer.projection` (768 -> LLM width, with bias) is Emu's `visual_proj`. Emu-I wraps the LLM
(`decoder.lm`) in a peft LoRA model whose adapters stay unmerged in the checkpoint; `merge_lora` folds them
in, after which its keys read as the pretrained checkpoint's.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from nextmm.convert.common import ConvertError, shortened

CFORMER = "cformer."
STACK = "cformer.cformer."
QUERIES = "cformer.causal_tokens"
PROJECTION = "cformer.projection."
# T5Stack keeps a reference to T5's shared word embedding, so the checkpoint carries it; the stack reads
# causal_tokens as its input embeddings and never looks a word up.
UNUSED = frozenset({"cformer.cformer.embed_tokens.weight"})

# The official stack's names (after `cformer.cformer.`) -> T5Resampler's.
STACK_KEYS = {
    "block.0.layer.0.SelfAttention.relative_attention_bias.weight": "relative_bias.weight",
    "final_layer_norm.weight": "norm.weight",
}
# One block's names (after `block.{i}.`) -> T5Resampler's (after `blocks.{i}.`).
BLOCK_KEYS = {
    "layer.0.layer_norm.weight": "norm_self.weight",
    **{f"layer.0.SelfAttention.{p}.weight": f"self_attn.{p}.weight" for p in "qkvo"},
    "layer.1.layer_norm.weight": "norm_cross.weight",
    **{f"layer.1.EncDecAttention.{p}.weight": f"cross_attn.{p}.weight" for p in "qkvo"},
    "layer.2.layer_norm.weight": "norm_mlp.weight",
    "layer.2.DenseReluDense.wi.weight": "mlp.wi.weight",
    "layer.2.DenseReluDense.wo.weight": "mlp.wo.weight",
}
BLOCK = re.compile(r"block\.(\d+)\.(.+)")


def cformer_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's causal transformer (`cformer.cformer.*` and `cformer.causal_tokens`) under
    `T5Resampler`'s names; the number of blocks is the checkpoint's. `cformer.projection` is left to
    `cformer_projection_state`. Any other `cformer.*` key, or a missing one, is an error."""
    ours: dict[str, torch.Tensor] = {}
    unexpected, blocks = [], set()
    for key, value in state.items():
        if not key.startswith(CFORMER) or key in UNUSED or key.startswith(PROJECTION):
            continue
        if key == QUERIES:
            ours["queries"] = value.flatten(0, -2)  # (1, N, width) -> (N, width)
            continue
        name = key[len(STACK):] if key.startswith(STACK) else ""
        block = BLOCK.fullmatch(name)
        if name in STACK_KEYS:
            ours[STACK_KEYS[name]] = value
        elif block and block[2] in BLOCK_KEYS:
            blocks.add(int(block[1]))
            ours[f"blocks.{block[1]}.{BLOCK_KEYS[block[2]]}"] = value
        else:
            unexpected.append(key)
    if not ours and not unexpected:
        raise ConvertError("the checkpoint holds no cformer.cformer.* or cformer.causal_tokens keys; give the Emu1 multimodal_encoder checkpoint (pytorch_model.bin)")
    expected = {QUERIES} | {STACK + k for k in STACK_KEYS}
    expected |= {f"{STACK}block.{i}.{k}" for i in range(max(blocks, default=-1) + 1) for k in BLOCK_KEYS}
    missing = expected - state.keys()
    if missing or unexpected:
        parts = [f"missing {shortened(missing)}" if missing else "", f"unexpected {shortened(unexpected)}" if unexpected else ""]
        raise ConvertError(
            f"the checkpoint's causal transformer is not Emu1's T5 stack ({'; '.join(p for p in parts if p)}); give the Emu1 checkpoint unmodified"
        )
    return ours


def cformer_projection_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`cformer.projection.{weight,bias}` (causal transformer width -> LLM width) under the names of a
    plain `nn.Linear`: Emu's `visual_proj`."""
    ours = {name: state.get(PROJECTION + name) for name in ("weight", "bias")}
    missing = [PROJECTION + name for name, value in ours.items() if value is None]
    if missing:
        raise ConvertError(f"the checkpoint lacks {', '.join(missing)}; give the Emu1 multimodal_encoder checkpoint unmodified")
    return ours


PEFT = "base_model.model."
# `<module>.lora_A.weight` as peft saves adapters alone, `<module>.lora_A.<adapter>.weight` in a module's state dict.
LORA = re.compile(r"(?P<module>.+)\.lora_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")
BASE_LAYER = re.compile(r"\.base_layer\.(weight|bias)$")


def merge_lora(state: Mapping[str, torch.Tensor], prefix: str, scale: float) -> dict[str, torch.Tensor]:
    """`state` with a peft LoRA model at `prefix` (Emu-I: "decoder.lm.") -> the same weights with every
    adapter folded in, W + scale * B @ A (scale = lora_alpha / r; Emu-I's r=16, alpha=16 give 1), and
    peft's wrapping gone: `<prefix>base_model.model.x.q_proj.base_layer.weight` (peft >= 0.7) or
    `....q_proj.weight` (earlier) becomes `<prefix>x.q_proj.weight`. Keys outside the wrapper pass
    through. The adapted layers are `nn.Linear`s (peft's fan_in_fan_out=False)."""
    wrapped = prefix + PEFT
    plain: dict[str, torch.Tensor] = {}
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    names = set()
    for key, value in state.items():
        if not key.startswith(wrapped):
            plain[key] = value
            continue
        key = prefix + key[len(wrapped):]
        lora = LORA.fullmatch(key)
        if lora:
            adapters.setdefault(lora["module"], {})[lora["side"]] = value
            names.add(lora["adapter"])
        elif ".lora_" in key:
            raise ConvertError(f"'{key}' is a peft adapter weight other than LoRA's A and B; merge the adapter with peft first (merge_and_unload)")
        else:
            plain[BASE_LAYER.sub(r".\1", key)] = value
    if len(names) > 1:
        raise ConvertError(f"the checkpoint holds {len(names)} LoRA adapters ({shortened(str(n) for n in names)}); keep the keys of one adapter")
    unpaired = [module for module, pair in adapters.items() if len(pair) < 2 or module + ".weight" not in plain]
    if unpaired:
        raise ConvertError(f"the LoRA adapters of {shortened(unpaired)} lack lora_A, lora_B or their base weight; give the whole checkpoint")
    for module, pair in adapters.items():
        base = plain[module + ".weight"]
        delta = pair["B"].float() @ pair["A"].float()
        plain[module + ".weight"] = (base.float() + scale * delta).to(base.dtype)
    return plain

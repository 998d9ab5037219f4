"""The official Emu1 checkpoint (baaivision/Emu, `Emu1/`) under nextmm's names, part by part, and
`convert_emu1`, which makes a nextmm model directory of it (`nextmm convert emu1`).

Its causal transformer ("cformer") is a T5 decoder stack, `cformer.cformer.*`, fed the learned
`cformer.causal_tokens` (1, N, 768); it maps onto `models.resampler_t5.T5Resampler`. Its
`cformer.projection` (768 -> LLM width, with bias) is Emu's `visual_proj`. Emu-I wraps the LLM
(`decoder.lm`) in a peft LoRA model whose adapters stay unmerged in the checkpoint; `merge_lora` folds them
in, after which its keys read as the pretrained checkpoint's.

Emu1 grows LLaMA's vocabulary by `[PAD] [IMG] [/IMG] <image>` (and `[USER] [ASSISTANT]` for Emu-I), in that
order; nextmm's tokenizer adds Emu's tokens in another (tokenizer.EMU_TOKENS, then `[PAD]`), so the added
rows of the embeddings and the LM head move by token name. The diffusers `unet/`, `vae/` and `scheduler/`
beside the checkpoint are not converted: nextmm's VisualDecoder reads the visual embeddings through a
condition projection of its own, which Emu1's UNet lacks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import torch
from tokenizers import AddedToken

from nextmm.config import Config, apply_overrides, make_config
from nextmm.convert.common import ConvertError, copy_into, mismatch, read_state_dict, shortened
from nextmm.convert.eva_clip import eva_state_from_open_clip
from nextmm.convert.hf_llm import llm_state_from_hf
from nextmm.convert.parts import pretrained_stages
from nextmm.tokenizer import ASSISTANT, IMAGE, IMG, IMG_END, PAD, USER, NextTokenizer

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
        raise ConvertError(f"the checkpoint's causal transformer is not Emu1's T5 stack ({mismatch(missing, unexpected)}); give the Emu1 checkpoint unmodified")
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


PRESET = "emu-14b"
ENCODER = "multimodal_encoder"  # the checkpoint folder's subfolder that holds pytorch_model.bin
LM = "decoder.lm."
REGRESSION_HEAD = LM + "stu_regress_head.weight"
# Emu1's added tokens in the order of their rows after LLaMA's (Emu1/models/modeling_llama.py): the
# pretrained Emu has the first four, Emu-I all six.
OFFICIAL_ADDED = (PAD, IMG, IMG_END, IMAGE, USER, ASSISTANT)
ADDED_COUNTS = (4, 6)
LORA_SCALE = 1.0  # Emu-I's lora_alpha / r = 16 / 16; the checkpoint records neither
# The tower's keys that Emu reads (EVA01: q and v biases, no k bias), so that a missing one is named as the
# checkpoint names it; its final norm and CLIP head follow the blocks, which Emu does not read.
TOWER_KEYS = ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed")
TOWER_BLOCK_KEYS = (
    *(f"{m}.{p}" for m in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")),
    "attn.qkv.weight", "attn.q_bias", "attn.v_bias",
)
# The LLM's matrices with a row per token: nextmm's name -> the checkpoint's.
TOKEN_ROWS = {"embed_tokens.weight": LM + "model.embed_tokens.weight", "lm_head.weight": LM + "lm_head.weight"}
# nextmm's part -> the checkpoint's keys that fill it, as errors name them.
PART_KEYS = {
    "vision": "visual.*", "ln_visual": "ln_visual.*", "resampler": "cformer.cformer.*, cformer.causal_tokens",
    "visual_proj": "cformer.projection.*", "llm": LM + "model.*, " + LM + "lm_head.weight", "regression_head": REGRESSION_HEAD,
}


def read_emu1(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an Emu1 checkpoint: its folder (holding multimodal_encoder/pytorch_model.bin), that
    folder or file, or one .bin / .pt / .safetensors file (Emu-instruct.pt)."""
    root = Path(path)
    return read_state_dict(root / ENCODER if (root / ENCODER).is_dir() else root)


def emu1_tokenizer(tokenizer_dir: str | Path, location_bins: int = 0) -> tuple[NextTokenizer, int]:
    """LLaMA's tokenizer with Emu's tokens (NextTokenizer.from_llm), padding with `[PAD]` as Emu does
    whichever pad the LLM's files name; and how many rows the LLM's own vocabulary takes."""
    tokenizer, added = NextTokenizer.from_llm(tokenizer_dir, location_bins)
    base = tokenizer.vocab_size - added
    ids = {token: tokenizer.tok.token_to_id(token) for token in OFFICIAL_ADDED}
    held = [token for token, i in ids.items() if i is not None and i < base]
    if held:
        raise ConvertError(f"the tokenizer in '{tokenizer_dir}' already holds {', '.join(held)}; give LLaMA's own tokenizer.json (Emu1's models/llama_config), to which Emu's tokens are added")
    if tokenizer.pad != PAD:
        tokenizer.tok.add_special_tokens([AddedToken(PAD, special=True, normalized=False)])
        tokenizer = NextTokenizer(tokenizer.tok, tokenizer.bos, tokenizer.eos, PAD, tokenizer.add_bos)
    return tokenizer, base


def token_rows(weight: torch.Tensor, tokenizer: NextTokenizer, base: int, key: str, tokenizer_dir: str | Path) -> torch.Tensor:
    """An embedding or LM-head matrix in the checkpoint's row order -> the same rows in `tokenizer`'s: LLaMA's
    `base` rows as they are, each added token's row found by name, and a row the checkpoint lacks
    (`[USER]` and `[ASSISTANT]` in the pretrained Emu, location tokens) the mean of LLaMA's rows, Emu's
    rule for a new token."""
    added = weight.shape[0] - base
    if added not in ADDED_COUNTS:
        raise ConvertError(
            f"the checkpoint's {key} has {weight.shape[0]} rows but the tokenizer in '{tokenizer_dir}' has {base} tokens of its own, "
            f"where Emu1 adds {' or '.join(map(str, ADDED_COUNTS))} to LLaMA's; give the tokenizer.json of the LLaMA the checkpoint was trained from (Emu1's models/llama_config)"
        )
    official = {token: base + row for row, token in enumerate(OFFICIAL_ADDED[:added])}
    mean = weight[:base].float().mean(0, keepdim=True).to(weight.dtype)
    names = [tokenizer.tok.id_to_token(i) for i in range(base, tokenizer.vocab_size)]
    return torch.cat([weight[:base], *(weight[official[n]][None] if n in official else mean for n in names)])


def emu1_parts(state: Mapping[str, torch.Tensor], cfg: Config, tokenizer: NextTokenizer, base: int, tokenizer_dir: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """The checkpoint's tensors, Emu-I's LoRA merged, as one state dict per part of nextmm's Emu (keyed by
    the part's attribute name). A key that belongs to no part is an error; the tower's final norm and CLIP
    head are left out, as Emu reads the tower before them."""
    state = merge_lora(state, LM, LORA_SCALE)
    llm_keys = [k for k in state if k.startswith(LM + "model.") or k == LM + "lm_head.weight"]
    known = ("visual.", "ln_visual.", CFORMER)
    leftover = [k for k in state if not k.startswith(known) and k not in llm_keys and k != REGRESSION_HEAD]
    if leftover:
        raise ConvertError(f"the checkpoint holds keys that are not Emu1's ({shortened(leftover)}); give the Emu1 checkpoint unmodified")
    tower = {f"visual.{k}" for k in TOWER_KEYS} | {f"visual.blocks.{i}.{k}" for i in range(cfg.vision.layers) for k in TOWER_BLOCK_KEYS}
    if tower - state.keys():
        raise ConvertError(f"the checkpoint lacks the tower's {shortened(tower - state.keys())}; give the Emu1 checkpoint unmodified, or set vision.layers to its number of blocks")
    llm = llm_state_from_hf({k[len(LM):]: state[k] for k in llm_keys}, cfg.llm)
    for name, key in TOKEN_ROWS.items():
        if name in llm:
            llm[name] = token_rows(llm[name], tokenizer, base, key, tokenizer_dir)
    return {
        "vision": eva_state_from_open_clip({k: v for k, v in state.items() if k.startswith("visual.")}, cfg.vision, "the checkpoint's visual.*"),
        "ln_visual": {k[len("ln_visual."):]: v for k, v in state.items() if k.startswith("ln_visual.")},
        "resampler": cformer_state(state),
        "visual_proj": cformer_projection_state(state),
        "llm": llm,
        "regression_head": {"weight": state[REGRESSION_HEAD]} if REGRESSION_HEAD in state else {},
    }


def emu1_config(overrides: Sequence[str] = ()) -> Config:
    """The paper's Emu (the emu-14b preset) with `overrides` on top. Stage 0 (a tower from scratch) and
    stage 2 (the visual decoder, not converted) train nothing unless the overrides ask."""
    return apply_overrides(pretrained_stages(make_config(PRESET), decoder=False), list(overrides))


def convert_emu1(checkpoint: str | Path, out: str | Path, tokenizer_dir: str | Path, overrides: Sequence[str] = ()) -> Path:
    """The official Emu1 or Emu-I checkpoint as a nextmm model directory at `out`, with LLaMA's tokenizer
    from `tokenizer_dir`; the config's sizes come from the emu-14b preset and `overrides`, and any tensor
    whose shape disagrees is named. Nothing is written unless every key of the checkpoint lands in the
    model and every parameter of the model is filled."""
    from nextmm.api import NextMM, build_model

    cfg = emu1_config(overrides)
    tokenizer, base = emu1_tokenizer(tokenizer_dir, cfg.tokenizer.location_bins)
    parts = emu1_parts(read_emu1(checkpoint), cfg, tokenizer, base, tokenizer_dir)
    model = build_model(cfg, tokenizer)
    cfg.tokenizer.vocab_size = cfg.llm.vocab_size
    unfilled = sorted({name.split(".")[0] for name, _ in model.named_parameters()} - parts.keys())
    if unfilled:
        raise ConvertError(f"the config builds parts the Emu1 checkpoint does not hold ({', '.join(unfilled)}); drop the --set options that turn them on")
    absent = [PART_KEYS[name] for name in parts if getattr(model, name) is None]
    if absent:
        raise ConvertError(f"the config leaves out the parts that hold the checkpoint's {'; '.join(absent)}; drop the --set options that turn them off")
    for name, part in parts.items():
        copy_into(getattr(model, name), part, f"{checkpoint} ({PART_KEYS[name]})")
    return NextMM(model, tokenizer, cfg).save(out)

"""Hugging Face causal LMs (Llama 2 and 3, Qwen2, Qwen3, Mistral) in and out of nextmm's LLaMA.

Hugging Face names a parameter as nextmm does under a `model.` prefix (the LM head excepted), so the
state-dict adapter renames, drops the rotary buffers older checkpoints carry, and fills a tied LM head
from the embeddings. Rotary settings are read in both spellings: `rope_theta` + `rope_scaling` (before
transformers 5) and `rope_parameters` (transformers 5); export writes the older one, which both read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from nextmm.config import LLMConfig
from nextmm.convert.common import ConvertError, copy_into, read_json, read_state_dict
from nextmm.models.llm import ROPE_SCALING_KEYS, ROPE_TYPES, LLaMA, rope_type
from nextmm.tokenizer import NextTokenizer
from nextmm.train.checkpoint import own_storage, write_atomically

MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
}
SUPPORTED = tuple(MODEL_TYPES)
DEFAULT_HEAD_DIM = {"Qwen3ForCausalLM": 128}  # transformers' value where config.json omits head_dim; else width / heads


def _architecture(hf_config: dict) -> str:
    architecture = (hf_config.get("architectures") or [None])[0]
    if architecture not in SUPPORTED:
        raise ConvertError(f"config.json's architecture '{architecture}' is not one nextmm loads; give one of {', '.join(SUPPORTED)}")
    return architecture


def _required(hf_config: dict, key: str):
    if hf_config.get(key) is None:
        raise ConvertError(f"config.json lacks '{key}'; restore the file from the model's source")
    return hf_config[key]


def _rope(hf_config: dict) -> tuple[float, dict]:
    """(theta, scaling) from either spelling; scaling holds only the keys its rope type uses."""
    params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf_config.get("rope_theta", 10000.0))
    kind = rope_type(params)
    if kind not in ROPE_SCALING_KEYS:
        raise ConvertError(f"config.json asks for rope type '{kind}', which nextmm does not implement; it supports {', '.join(ROPE_TYPES)}")
    missing = [k for k in ROPE_SCALING_KEYS[kind] if k not in params]
    if missing:
        raise ConvertError(f"config.json's '{kind}' rope scaling lacks {', '.join(missing)}; restore the file from the model's source")
    scaling = {"rope_type": kind, **{k: params[k] for k in ROPE_SCALING_KEYS[kind]}}
    return float(theta), scaling if kind != "default" else {}


def _refuse_unsupported(hf_config: dict, architecture: str) -> None:
    """Options these families allow that nextmm's LLaMA does not build: each is one clear error."""
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"config.json's hidden_act is '{hf_config['hidden_act']}'; nextmm's LLaMA uses SwiGLU with silu only")
    if hf_config.get("mlp_bias"):
        raise ConvertError("config.json sets mlp_bias, which nextmm's LLaMA does not build; give a model without MLP biases")
    if hf_config.get("attention_bias") and architecture != "Qwen2ForCausalLM":
        raise ConvertError("config.json sets attention_bias (a bias on the output projection too), which nextmm's LLaMA does not build")
    if hf_config.get("use_sliding_window"):
        raise ConvertError("config.json sets use_sliding_window, a window on some layers only, which nextmm's LLaMA does not build; set it to false")
    if hf_config.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConvertError("config.json sets partial_rotary_factor, which nextmm's LLaMA does not build; give a model that rotates whole heads")


def llm_config_from_hf(hf_config: dict) -> LLMConfig:
    """nextmm's LLMConfig for a Hugging Face config.json (as a dict) of one of SUPPORTED."""
    architecture = _architecture(hf_config)
    _refuse_unsupported(hf_config, architecture)
    theta, scaling = _rope(hf_config)
    heads = _required(hf_config, "num_attention_heads")
    return LLMConfig(
        vocab_size=_required(hf_config, "vocab_size"),
        width=_required(hf_config, "hidden_size"),
        layers=_required(hf_config, "num_hidden_layers"),
        heads=heads,
        kv_heads=hf_config.get("num_key_value_heads") or heads,
        head_dim=hf_config.get("head_dim") or DEFAULT_HEAD_DIM.get(architecture, 0),
        mlp_hidden=_required(hf_config, "intermediate_size"),
        max_seq_len=_required(hf_config, "max_position_embeddings"),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        qkv_bias=architecture == "Qwen2ForCausalLM",
        qk_norm=architecture == "Qwen3ForCausalLM",
        sliding_window=(hf_config.get("sliding_window") or 0) if architecture == "MistralForCausalLM" else 0,
    )


def llm_state_from_hf(state: dict[str, torch.Tensor], cfg: LLMConfig) -> dict[str, torch.Tensor]:
    """A Hugging Face causal LM's tensors under nextmm's LLaMA names. Keys outside the model stay as they
    are, so that copy_into names them as unexpected."""
    ours = {name.removeprefix("model."): tensor for name, tensor in state.items() if not name.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings and "embed_tokens.weight" in ours:
        ours.setdefault("lm_head.weight", ours["embed_tokens.weight"])  # tied checkpoints save the embeddings once
    return ours


def load_hf_llm(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[LLaMA, LLMConfig]:
    """nextmm's LLaMA holding the weights of a local Hugging Face model directory (config.json and
    model.safetensors, sharded safetensors or pytorch_model.bin), in `dtype`."""
    root = Path(path)
    cfg = llm_config_from_hf(read_json(root / "config.json"))
    state = llm_state_from_hf(read_state_dict(root), cfg)
    llm = LLaMA(cfg).to(dtype)
    copy_into(llm, state, str(root))
    return llm, cfg


def _with_mean_rows(weight: torch.Tensor, new_rows: int) -> nn.Parameter:
    mean = weight.detach().float().mean(0, keepdim=True).to(weight.dtype)
    return nn.Parameter(torch.cat([weight.detach(), mean.expand(new_rows, -1)]), requires_grad=weight.requires_grad)


def grow_vocabulary(llm: LLaMA, new_rows: int) -> None:
    """Appends `new_rows` rows to the input embeddings and to the output layer, each the mean of the existing
    rows (Emu's rule for its added tokens): a new token starts as an average word, neither favoured nor
    shunned by the LM head. A tied model stays tied; llm.cfg.vocab_size follows."""
    if new_rows < 0:
        raise ValueError(f"new_rows is {new_rows}; a vocabulary only grows")
    if new_rows == 0:
        return
    llm.embed_tokens.weight = _with_mean_rows(llm.embed_tokens.weight, new_rows)
    llm.embed_tokens.num_embeddings += new_rows
    llm.lm_head.weight = llm.embed_tokens.weight if llm.cfg.tie_embeddings else _with_mean_rows(llm.lm_head.weight, new_rows)
    llm.lm_head.out_features += new_rows
    llm.cfg.vocab_size += new_rows


def _check_expressible(cfg: LLMConfig, architecture: str) -> None:
    """Each architecture builds a fixed set of options; a model with others would load wrong, so it is refused."""
    needs = {"q/k/v biases": (cfg.qkv_bias, "Qwen2ForCausalLM"), "q/k norms": (cfg.qk_norm, "Qwen3ForCausalLM")}
    for feature, (present, owner) in needs.items():
        if present != (architecture == owner):
            has = "has" if present else "lacks"
            raise ConvertError(f"the model {has} {feature}, so it cannot be written as {architecture}; export it as {owner if present else 'LlamaForCausalLM'}")
    if cfg.sliding_window and architecture != "MistralForCausalLM":
        raise ConvertError(f"the model attends through a sliding window, so it cannot be written as {architecture}; export it as MistralForCausalLM")


def hf_config_from_llm(cfg: LLMConfig, architecture: str, tokenizer: NextTokenizer, dtype: torch.dtype) -> dict:
    """The config.json that makes `architecture` in transformers compute what `cfg` does."""
    if architecture not in SUPPORTED:
        raise ConvertError(f"architecture '{architecture}' is not one nextmm exports; give one of {', '.join(SUPPORTED)}")
    _check_expressible(cfg, architecture)
    config = {
        "architectures": [architecture],
        "model_type": MODEL_TYPES[architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads or cfg.heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling or None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if architecture == "MistralForCausalLM":
        config["sliding_window"] = cfg.sliding_window or None
    return config


def hf_state_from_llm(llm: LLaMA) -> dict[str, torch.Tensor]:
    """The LLaMA's tensors under Hugging Face's names; a tied LM head is left to the embeddings, as
    transformers saves it."""
    return own_storage({
        name if name == "lm_head.weight" else f"model.{name}": tensor.detach().contiguous()
        for name, tensor in llm.state_dict().items()
        if not (name == "lm_head.weight" and llm.cfg.tie_embeddings)
    })


def export_hf_llm(llm: LLaMA, cfg: LLMConfig, tokenizer: NextTokenizer, out_dir: str | Path, architecture: str) -> Path:
    """A Hugging Face model directory (config.json, model.safetensors, tokenizer.json and
    tokenizer_config.json) that transformers' AutoModelForCausalLM and AutoTokenizer load; written under a
    temporary name and renamed into place, so a failure leaves nothing half written."""
    if cfg.vocab_size != llm.embed_tokens.num_embeddings:
        raise ConvertError(f"cfg.vocab_size is {cfg.vocab_size} but the model has {llm.embed_tokens.num_embeddings} embedding rows; pass the model's own config (llm.cfg)")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConvertError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model {cfg.vocab_size} embedding rows; "
            "grow the model's vocabulary (grow_vocabulary) before exporting"
        )
    dtype = llm.embed_tokens.weight.dtype
    config = hf_config_from_llm(cfg, architecture, tokenizer, dtype)

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(hf_state_from_llm(llm), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(tmp / "tokenizer.json")

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(out, fill)

"""Hugging Face causal LMs in and out of nextmm's LLaMA, checked against transformers itself.

Each family is a tiny random model that transformers builds and saves in tmp_path in its real format;
nextmm loads it and must give the same logits, the same hidden state after every layer and the same
greedy tokens (through its own KV-cached loop) as transformers, in fp32.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from nextmm.config import LLMConfig
from nextmm.convert.common import ConvertError
from nextmm.convert.hf_llm import export_hf_llm, grow_vocabulary, llm_config_from_hf, load_hf_llm
from nextmm.errors import UserError
from nextmm.models.llm import KVCache, LLaMA
from nextmm.tokenizer import EMU_TOKENS, PAD, NextTokenizer

VOCAB = 300
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
CASES = {
    "llama3-rope-gqa-untied": ("llama", {"rope_parameters": {"rope_theta": 500000.0, **LLAMA3_ROPE}}, "safetensors"),
    "llama2-tied-mha-bin": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}, "bin"),
    "llama-linear-rope": ("llama", {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}}, "safetensors"),
    "qwen2-bias-tied-sharded": ("qwen2", {"tie_word_embeddings": True}, "sharded"),
    "qwen3-qk-norm-head-dim": ("qwen3", {"head_dim": 24}, "safetensors"),
    "mistral-sliding-window": ("mistral", {"sliding_window": 5}, "safetensors"),
}
TEXTS = ["the quick brown fox jumps over the lazy dog", "a red circle left of a blue square",
         "what shape is the green object?", "hello world, this is a tiny tokenizer"] * 10


def save_tiny_hf(tmp_path, model_type: str, overrides: dict, fmt: str = "safetensors", seed: int = 0):
    config = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    root = tmp_path / model_type
    if fmt == "sharded":
        model.save_pretrained(root, max_shard_size="100KB")
        assert (root / "model.safetensors.index.json").is_file()
    else:
        model.save_pretrained(root)
    if fmt == "bin":  # transformers 5 writes safetensors only; older releases wrote this pickle
        state = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and config.tie_word_embeddings)}
        torch.save(state, root / "pytorch_model.bin")
        (root / "model.safetensors").unlink()
    return model, root


def layer_outputs(llm: LLaMA, embeds: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    seen = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: seen.append(out)) for layer in llm.layers]
    try:
        final = llm(embeds)
    finally:
        for hook in hooks:
            hook.remove()
    return seen, final


@torch.no_grad()
def greedy(llm: LLaMA, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """nextmm's own decoding loop: prefill into a KV cache, then one token at a time."""
    cache = KVCache(llm.cfg, prompt.shape[0], prompt.shape[1] + new_tokens, torch.float32)
    hidden = llm(llm.embed_tokens(prompt), cache=cache)
    out = []
    for _ in range(new_tokens):
        token = llm.lm_head(hidden[:, -1]).argmax(-1)
        out.append(int(token))
        hidden = llm(llm.embed_tokens(token[:, None]), cache=cache)
    return out


@pytest.mark.parametrize("case", CASES)
def test_hf_model_matches_transformers(tmp_path, case):
    model_type, overrides, fmt = CASES[case]
    hf, root = save_tiny_hf(tmp_path, model_type, overrides, fmt)
    llm, cfg = load_hf_llm(root)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        embeds = llm.embed_tokens(ids)
        layers, final = layer_outputs(llm, embeds)
        logits = llm.lm_head(final)
    ours = [embeds, *layers[:-1], final]  # transformers gives the last layer's output after the final norm
    assert len(ours) == len(ref.hidden_states)
    for k, (a, b) in enumerate(zip(ours, ref.hidden_states)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda m: f"hidden state {k}: {m}")
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=0)

    prompt = ids[:1, :6]
    expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
    assert len(set(expected)) >= 4, "the random model repeats itself; the greedy comparison would prove little"
    assert greedy(llm, prompt, 12) == expected


def test_config_reads_both_rope_spellings():
    new = {"architectures": ["LlamaForCausalLM"], **TINY, "rope_parameters": {"rope_theta": 500000.0, **LLAMA3_ROPE}}
    old = {**new, "rope_theta": 500000.0, "rope_scaling": {**LLAMA3_ROPE}}
    del old["rope_parameters"]
    assert llm_config_from_hf(new) == llm_config_from_hf(old)
    cfg = llm_config_from_hf(old)
    assert (cfg.rope_theta, cfg.rope_scaling["rope_type"], cfg.max_seq_len, cfg.kv_heads) == (500000.0, "llama3", 64, 2)
    linear = llm_config_from_hf({**old, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_unsupported_rope_type_is_named():
    config = {"architectures": ["LlamaForCausalLM"], **TINY, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ConvertError, match=r"'yarn'.*default, linear, llama3"):
        llm_config_from_hf(config)


def test_default_config_keeps_its_parameters():
    llm = LLaMA(LLMConfig(vocab_size=50, width=32, layers=1, heads=2))
    attn = [k for k in llm.state_dict() if ".self_attn." in k]
    assert attn == [f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo"]
    assert llm.layers[0].self_attn.q_proj.weight.shape == (32, 32)


# --- vocabulary growth and export ---------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_grow_vocabulary_appends_mean_rows(tmp_path, tied):
    _, root = save_tiny_hf(tmp_path, "llama", {"tie_word_embeddings": tied})
    llm, cfg = load_hf_llm(root)
    embed, head = llm.embed_tokens.weight.detach().clone(), llm.lm_head.weight.detach().clone()
    grow_vocabulary(llm, 3)
    assert cfg.vocab_size == VOCAB + 3 and llm.embed_tokens.weight.shape == (VOCAB + 3, 64) == llm.lm_head.weight.shape
    torch.testing.assert_close(llm.embed_tokens.weight[:VOCAB], embed)
    torch.testing.assert_close(llm.lm_head.weight[:VOCAB], head)
    torch.testing.assert_close(llm.embed_tokens.weight[VOCAB:], embed.mean(0).expand(3, -1))
    torch.testing.assert_close(llm.lm_head.weight[VOCAB:], head.mean(0).expand(3, -1))
    assert (llm.lm_head.weight is llm.embed_tokens.weight) == tied
    hidden = llm(llm.embed_tokens(torch.tensor([[1, VOCAB + 2]])))
    assert llm.lm_head(hidden).shape == (1, 2, VOCAB + 3)


@pytest.mark.parametrize("model_type,architecture,overrides", [
    ("llama", "LlamaForCausalLM", {}),
    ("qwen3", "Qwen3ForCausalLM", {"head_dim": 24, "tie_word_embeddings": True}),
])
def test_export_round_trip(tmp_path, model_type, architecture, overrides):
    _, root = save_tiny_hf(tmp_path, model_type, overrides)
    write_bytelevel_tokenizer(root, bos=model_type == "llama")
    llm, cfg = load_hf_llm(root)
    tok, new_rows = NextTokenizer.from_llm(root, location_bins=4)
    grow_vocabulary(llm, new_rows)
    out = export_hf_llm(llm, cfg, tok, tmp_path / "exported", architecture)

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tok.start_ids + tok.encode("a red circle") + [tok.img_id, tok.image_id, tok.img_end_id]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, llm.lm_head(llm(llm.embed_tokens(ids))), atol=1e-5, rtol=0)
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert len(hf_tok) == cfg.vocab_size == hf.config.vocab_size
    assert hf_tok.convert_tokens_to_ids(["[IMG]", "<bin_3>"]) == [tok.img_id, tok.bin_ids[3]]
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.eos_id, tok.pad_id)
    assert hf_tok("a red circle")["input_ids"] == tok.start_ids + tok.encode("a red circle")


def test_export_refuses_an_architecture_that_cannot_hold_the_model(tmp_path):
    _, root = save_tiny_hf(tmp_path, "qwen2", {})
    write_bytelevel_tokenizer(root, bos=False)
    llm, cfg = load_hf_llm(root)
    tok, new_rows = NextTokenizer.from_llm(root)
    with pytest.raises(ConvertError, match="grow the model's vocabulary"):
        export_hf_llm(llm, cfg, tok, tmp_path / "out", "Qwen2ForCausalLM")
    grow_vocabulary(llm, new_rows)
    with pytest.raises(ConvertError, match="has q/k/v biases, so it cannot be written as LlamaForCausalLM; export it as Qwen2ForCausalLM"):
        export_hf_llm(llm, cfg, tok, tmp_path / "out", "LlamaForCausalLM")
    assert not any(tmp_path.glob("*out*"))


# --- bad input ----------------------------------------------------------------------------------


def test_unsupported_architecture_is_named(tmp_path):
    with pytest.raises(ConvertError, match=r"'GPT2LMHeadModel'.*LlamaForCausalLM, Qwen2ForCausalLM"):
        llm_config_from_hf({"architectures": ["GPT2LMHeadModel"], "n_embd": 64})


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    _, root = save_tiny_hf(tmp_path, "llama", {})
    from safetensors.torch import load_file, save_file

    state = load_file(root / "model.safetensors")
    for layer in range(2):
        state.pop(f"model.layers.{layer}.mlp.up_proj.weight")
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(1)
    save_file(state, root / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConvertError, match=r"missing layers\.0\.mlp\.up_proj\.weight, layers\.1\.mlp\.up_proj\.weight; unexpected layers\.0\.mlp\.extra\.weight"):
        load_hf_llm(root)


def test_wrong_shape_names_the_tensor_and_both_shapes(tmp_path):
    _, root = save_tiny_hf(tmp_path, "llama", {})
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(ConvertError, match=r"'layers\.0\.mlp\.down_proj\.weight' has shape \(64, 96\) where the model expects \(64, 128\)"):
        load_hf_llm(root)


class NotATensor:
    pass


def test_a_pickle_with_objects_is_refused(tmp_path):
    _, root = save_tiny_hf(tmp_path, "llama", {}, fmt="bin")
    torch.save({"model.norm.weight": NotATensor()}, root / "pytorch_model.bin")
    with pytest.raises(ConvertError, match="weights_only"):
        load_hf_llm(root)


def test_tokenizer_without_eos_is_refused(tmp_path):
    root = tmp_path / "llm"
    root.mkdir()
    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=280, show_progress=False))
    bare.save(str(root / "tokenizer.json"))
    with pytest.raises(UserError, match="names no EOS token"):
        NextTokenizer.from_llm(root)
    with pytest.raises(UserError, match="holds no tokenizer.json"):
        NextTokenizer.from_llm(tmp_path)


# --- the LLM's own tokenizer --------------------------------------------------------------------


def write_metaspace_tokenizer(root, vocab_size: int = 200) -> None:
    """Llama 2's layout: sentencepiece-style BPE (Metaspace, pieces within words), `<s>` added before every text."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.save(str(root / "tokenizer.json"))
    roles = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}
    (root / "tokenizer_config.json").write_text(json.dumps(roles))


def write_bytelevel_tokenizer(root, bos: bool) -> None:
    """Llama 3's layout (byte-level BPE, `<|begin_of_text|>` before every text) or, without `bos`, Qwen's
    (no BOS, and a pad that is its EOS)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    specials = ["<|begin_of_text|>", "<|end_of_text|>"] if bos else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[(specials[0], tok.token_to_id(specials[0]))])
        roles = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[0], "eos_token": specials[1]}
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        roles = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(roles))


@pytest.mark.parametrize("style", ["metaspace", "bytelevel-bos", "bytelevel-no-bos"])
def test_llm_tokenizer_encodes_as_transformers(tmp_path, style):
    root = tmp_path / style
    root.mkdir()
    if style == "metaspace":
        write_metaspace_tokenizer(root)
    else:
        write_bytelevel_tokenizer(root, bos=style == "bytelevel-bos")
    hf = AutoTokenizer.from_pretrained(root)
    tok, new_rows = NextTokenizer.from_llm(root, location_bins=8)
    for text in ("the quick brown fox", "what shape is the green object?", "hello world, a red circle"):
        assert tok.start_ids + tok.encode(text) == hf(text)["input_ids"]
        assert tok.decode(tok.encode(text)) == text
    assert tok.add_bos == (style != "bytelevel-no-bos")
    assert tok.eos_id == hf.eos_token_id
    # Emu's tokens, a [PAD] where the LLM's pad is missing or is its EOS, and the bins follow the vocabulary
    added = [*EMU_TOKENS, PAD, *(f"<bin_{k}>" for k in range(8))]
    assert new_rows == len(added) and tok.vocab_size == len(hf) + new_rows
    assert [tok.tok.token_to_id(t) for t in added] == list(range(len(hf), len(hf) + new_rows))
    assert tok.location_bins == 8 and tok.pad_id == tok.tok.token_to_id(PAD)
    assert tok.encode("[IMG]<image>[/IMG]") == [tok.img_id, tok.image_id, tok.img_end_id]


def test_llm_tokenizer_reads_roles_from_config_and_follows_padded_embedding_rows(tmp_path):
    root = tmp_path / "llm"
    root.mkdir()
    write_metaspace_tokenizer(root)
    size = Tokenizer.from_file(str(root / "tokenizer.json")).get_vocab_size()
    roles = json.loads((root / "tokenizer_config.json").read_text())
    (root / "tokenizer_config.json").write_text(json.dumps({**roles, "eos_token": None}))
    # EOS by id (the first of several), the pad by id, and embedding rows past the tokenizer's last id
    (root / "config.json").write_text(json.dumps({"vocab_size": size + 10, "eos_token_id": [2, 1], "pad_token_id": 0}))
    tok, new_rows = NextTokenizer.from_llm(root)
    assert new_rows == len(EMU_TOKENS) and (tok.eos_id, tok.pad_id, tok.bos_id) == (2, 0, 1)
    assert [tok.tok.token_to_id(t) for t in EMU_TOKENS] == list(range(size + 10, size + 10 + new_rows))
    assert tok.vocab_size == size + 10 + new_rows


def test_llm_tokenizer_roles_survive_save_and_load(tmp_path):
    root = tmp_path / "llm"
    root.mkdir()
    write_bytelevel_tokenizer(root, bos=False)
    tok, _ = NextTokenizer.from_llm(root, location_bins=4)
    tok.save(tmp_path / "tokenizer.json")
    again = NextTokenizer.load(tmp_path / "tokenizer.json")
    roles = ("bos_id", "eos_id", "pad_id", "add_bos", "img_id", "location_bins", "vocab_size", "start_ids")
    assert [getattr(again, r) for r in roles] == [getattr(tok, r) for r in roles]
    assert again.bos_id is None and again.start_ids == []


def test_a_tokenizer_saved_without_roles_loads_with_nextmm_own(tmp_path):
    tok = NextTokenizer.train(TEXTS, vocab_size=100, location_bins=4)
    tok.save(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").unlink()  # a tokenizer.json alone: nextmm's own roles apply
    again = NextTokenizer.load(tmp_path / "tokenizer.json")
    assert (again.bos_id, again.eos_id, again.pad_id, again.start_ids) == (tok.bos_id, tok.eos_id, tok.pad_id, [tok.bos_id])
    assert [again.tok.id_to_token(i) for i in (again.bos_id, again.eos_id, again.pad_id)] == ["[BOS]", "[EOS]", "[PAD]"]

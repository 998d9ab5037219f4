import json
import shutil

import pytest
import torch
from torch import nn
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Stack

from nextmm import api
from nextmm.cli import main
from nextmm.config import ResamplerConfig, make_config
from nextmm.convert.common import ConvertError, copy_into, read_state_dict
from nextmm.convert.emu1 import cformer_projection_state, cformer_state, merge_lora
from nextmm.convert.hf_llm import hf_state_from_llm
from nextmm.data.sample import Image, Text
from nextmm.data.sequence import SequenceBuilder
from nextmm.models.resampler_t5 import T5Resampler
from nextmm.tokenizer import NextTokenizer
from test_cli import assert_one_clear_line, run
from test_convert_llm import write_metaspace_tokenizer
from test_paper_model import SHRUNK

CFG = ResamplerConfig(kind="t5", seed="none", num_queries=6, width=16, layers=2, heads=2, head_width=8, mlp_ratio=2.0)
VISION, LLM = 24, 20  # the tower is wider than the causal transformer, as in Emu-14B (1408 -> 768)


def official_checkpoint() -> dict[str, torch.Tensor]:
    """An Emu1 multimodal_encoder state dict in miniature: the cformer's names come from transformers'
    T5Stack (the class Emu1's modeling_t5 derives from), its cross-attention keys and values widened to
    the tower's width as Emu1's `encoder_width` makes them; a few keys of the other parts beside it."""
    config = T5Config(vocab_size=10, d_model=CFG.width, d_kv=CFG.head_width, num_heads=CFG.heads, d_ff=32, num_layers=CFG.layers, is_decoder=True)
    stack = {f"cformer.cformer.{k}": v for k, v in T5Stack(config).state_dict().items()}
    for key in stack:
        if ".EncDecAttention.k." in key or ".EncDecAttention.v." in key:
            stack[key] = torch.randn(CFG.heads * CFG.head_width, VISION)
    return stack | {
        "cformer.causal_tokens": torch.randn(1, CFG.num_queries, CFG.width),
        "cformer.projection.weight": torch.randn(LLM, CFG.width),
        "cformer.projection.bias": torch.randn(LLM),
        "visual.patch_embed.proj.weight": torch.randn(VISION, 3, 2, 2),
        "ln_visual.weight": torch.ones(VISION),
        "decoder.lm.lm_head.weight": torch.randn(40, LLM),
        "decoder.lm.stu_regress_head.weight": torch.randn(LLM, LLM),
    }


def test_cformer_loads_into_the_t5_resampler():
    state = official_checkpoint()
    assert "cformer.cformer.embed_tokens.weight" in state  # T5Stack carries the unused word embedding
    ours = T5Resampler(CFG, VISION)
    copy_into(ours, cformer_state(state), "emu1")
    assert torch.equal(ours.queries, state["cformer.causal_tokens"][0])
    assert torch.equal(ours.relative_bias.weight, state["cformer.cformer.block.0.layer.0.SelfAttention.relative_attention_bias.weight"])
    assert torch.equal(ours.blocks[1].cross_attn.v.weight, state["cformer.cformer.block.1.layer.1.EncDecAttention.v.weight"])
    assert ours(torch.randn(2, 5, VISION)).shape == (2, CFG.num_queries, CFG.width)


def test_projection_is_a_linear_to_the_llm_width():
    state = official_checkpoint()
    proj = nn.Linear(CFG.width, LLM)
    proj.load_state_dict(cformer_projection_state(state))
    assert torch.equal(proj.bias, state["cformer.projection.bias"])
    del state["cformer.projection.bias"]
    with pytest.raises(ConvertError, match=r"cformer\.projection\.bias"):
        cformer_projection_state(state)


def test_deepspeed_wrapped_checkpoint_passes_through(tmp_path):
    state = official_checkpoint()
    torch.save({"module": state}, tmp_path / "pytorch_model.bin")
    mapped, read = cformer_state(state), cformer_state(read_state_dict(tmp_path))
    assert mapped.keys() == read.keys() and all(torch.equal(mapped[k], read[k]) for k in mapped)


def test_missing_and_unexpected_cformer_keys_are_named():
    state = official_checkpoint()
    del state["cformer.cformer.block.1.layer.2.DenseReluDense.wo.weight"]
    state["cformer.cformer.block.0.layer.3.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConvertError) as err:
        cformer_state(state)
    assert "missing cformer.cformer.block.1.layer.2.DenseReluDense.wo.weight" in str(err.value)
    assert "unexpected cformer.cformer.block.0.layer.3.extra.weight" in str(err.value)


def test_a_checkpoint_without_a_cformer_is_named():
    with pytest.raises(ConvertError, match="no cformer"):
        cformer_state({"visual.patch_embed.proj.weight": torch.zeros(1)})


def test_merge_lora_folds_scaled_b_a_into_the_base_weight():
    w, a, b = torch.randn(6, 4), torch.randn(2, 4), torch.randn(6, 2)
    wrapped = "decoder.lm.base_model.model.model.layers.0.self_attn.q_proj."
    state = {
        wrapped + "base_layer.weight": w, wrapped + "lora_A.weight": a, wrapped + "lora_B.weight": b,
        "decoder.lm.base_model.model.lm_head.weight": torch.ones(3), "cformer.causal_tokens": torch.zeros(2),
    }
    merged = merge_lora(state, "decoder.lm.", 0.5)
    assert merged.keys() == {"decoder.lm.model.layers.0.self_attn.q_proj.weight", "decoder.lm.lm_head.weight", "cformer.causal_tokens"}
    torch.testing.assert_close(merged["decoder.lm.model.layers.0.self_attn.q_proj.weight"], w + 0.5 * b @ a)


@pytest.mark.parametrize(
    "drop, add, named",
    [("lora_B.default.weight", {}, "lack lora_A, lora_B"), (None, {"lora_A.other.weight": torch.zeros(2, 4)}, "2 LoRA adapters")],
)
def test_merge_lora_names_what_it_cannot_fold(drop, add, named):
    wrapped = "base_model.model.layers.0.q_proj."
    state = {wrapped + "weight": torch.zeros(6, 4), wrapped + "lora_A.default.weight": torch.zeros(2, 4), wrapped + "lora_B.default.weight": torch.zeros(6, 2)}
    state = {k: v for k, v in state.items() if not k.endswith(drop or "-")} | {wrapped + k: v for k, v in add.items()}
    with pytest.raises(ConvertError, match=named):
        merge_lora(state, "", 1.0)


@pytest.mark.parametrize("layout", ["base_layer", "pre-0.7 peft: base weight in place"])
def test_merge_lora_matches_peft_merge_and_unload(layout):
    """Emu-I's layout in miniature: a peft LoRA (q, k, v, o) around the LLM at `decoder.lm`, saved whole."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)
    emu = nn.Module()
    emu.decoder = nn.Module()
    emu.decoder.lm = peft.get_peft_model(llama, lora)
    with torch.no_grad():  # peft starts B at zero, which would merge to nothing
        for name, param in emu.named_parameters():
            if "lora_" in name:
                param.normal_()
    state = {k: v.clone() for k, v in emu.state_dict().items()}
    assert "decoder.lm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in state
    if layout != "base_layer":
        state = {k.replace(".base_layer.", "."): v for k, v in state.items()}
    merged = merge_lora(state, "decoder.lm.", lora.lora_alpha / lora.r)
    emu.decoder.lm = emu.decoder.lm.merge_and_unload()
    expected = emu.state_dict()
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-5, msg=key)


# The checkpoint's own row order after LLaMA's vocabulary (Emu1/models/modeling_llama.py), written here by
# hand: nextmm's tokenizer adds the same tokens in another order.
EMU1_ROWS = ["[PAD]", "[IMG]", "[/IMG]", "<image>", "[USER]", "[ASSISTANT]"]
SETS = sum((["--set", s] for s in SHRUNK), [])
CAPTION = "a red circle left of a blue square"


def official_names(model, tokenizer, added: int) -> dict[str, torch.Tensor]:
    """A nextmm paper model's weights under the official Emu1 checkpoint's names and layout: EVA's fused qkv
    with separate q and v biases, the tower's final norm and CLIP head (which Emu never reads), the T5
    stack's names with its unused word embedding, transformers 4.29's LLaMA names with their rotary
    buffers, and the first `added` of Emu1's added token rows in Emu1's order."""
    state = {}
    vision = model.vision.state_dict()
    state |= {"visual.patch_embed.proj.weight": vision["patch_embed.weight"], "visual.patch_embed.proj.bias": vision["patch_embed.bias"],
              "visual.cls_token": vision["cls"], "visual.pos_embed": vision["pos"]}
    for i in range(len(model.vision.blocks)):
        ours, theirs = f"blocks.{i}.", f"visual.blocks.{i}."
        for name in ("norm1", "norm2"):
            state |= {f"{theirs}{name}.{p}": vision[f"{ours}{name}.{p}"] for p in ("weight", "bias")}
        q, _, v = vision[ours + "attn.qkv.bias"].chunk(3)
        state |= {theirs + "attn.qkv.weight": vision[ours + "attn.qkv.weight"], theirs + "attn.q_bias": q, theirs + "attn.v_bias": v}
        for official, name in {"attn.proj": "attn.out", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2"}.items():
            state |= {f"{theirs}{official}.{p}": vision[f"{ours}{name}.{p}"] for p in ("weight", "bias")}
    width = model.cfg.vision.width
    state |= {"visual.norm.weight": torch.randn(width), "visual.norm.bias": torch.randn(width),
              "visual.head.weight": torch.randn(12, width), "visual.head.bias": torch.randn(12)}
    state |= {f"ln_visual.{p}": t for p, t in model.ln_visual.state_dict().items()}
    resampler = model.resampler.state_dict()
    stack = "cformer.cformer."
    state |= {"cformer.causal_tokens": resampler["queries"][None], stack + "embed_tokens.weight": torch.randn(10, model.cfg.resampler.width),
              stack + "block.0.layer.0.SelfAttention.relative_attention_bias.weight": resampler["relative_bias.weight"],
              stack + "final_layer_norm.weight": resampler["norm.weight"]}
    for i in range(len(model.resampler.blocks)):
        ours, theirs = f"blocks.{i}.", f"{stack}block.{i}."
        state |= {theirs + "layer.0.layer_norm.weight": resampler[ours + "norm_self.weight"],
                  theirs + "layer.1.layer_norm.weight": resampler[ours + "norm_cross.weight"],
                  theirs + "layer.2.layer_norm.weight": resampler[ours + "norm_mlp.weight"],
                  theirs + "layer.2.DenseReluDense.wi.weight": resampler[ours + "mlp.wi.weight"],
                  theirs + "layer.2.DenseReluDense.wo.weight": resampler[ours + "mlp.wo.weight"]}
        for p in "qkvo":
            state[f"{theirs}layer.0.SelfAttention.{p}.weight"] = resampler[f"{ours}self_attn.{p}.weight"]
            state[f"{theirs}layer.1.EncDecAttention.{p}.weight"] = resampler[f"{ours}cross_attn.{p}.weight"]
    state |= {f"cformer.projection.{p}": t for p, t in model.visual_proj.state_dict().items()}
    llm = hf_state_from_llm(model.llm)
    base = tokenizer.vocab_size - len(EMU1_ROWS)
    order = list(range(base)) + [tokenizer.tok.token_to_id(t) for t in EMU1_ROWS[:added]]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        llm[name] = llm[name][order]
    state |= {f"decoder.lm.{k}": v for k, v in llm.items()}
    head_size = model.cfg.llm.width // model.cfg.llm.heads
    state |= {f"decoder.lm.model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.randn(head_size // 2) for i in range(model.cfg.llm.layers)}
    state["decoder.lm.stu_regress_head.weight"] = model.regression_head.weight.detach()
    return {k: v.detach().clone() for k, v in state.items()}


def with_lora(state: dict[str, torch.Tensor], rank: int = 2) -> dict[str, torch.Tensor]:
    """Emu-I's layout: the LLM inside a peft LoRA model (peft >= 0.7 names), its q, k, v and o adapters
    unmerged; the base weights are chosen so that merging (scale 1, Emu-I's alpha / r) gives `state`'s."""
    wrapped = {}
    for key, value in state.items():
        if not key.startswith("decoder.lm."):
            wrapped[key] = value
            continue
        key = "decoder.lm.base_model.model." + key[len("decoder.lm."):]
        if any(f".self_attn.{p}_proj.weight" in key for p in "qkvo"):
            module = key[: -len(".weight")]
            a, b = torch.randn(rank, value.shape[1]), torch.randn(value.shape[0], rank)
            wrapped |= {module + ".base_layer.weight": value - b @ a, module + ".lora_A.default.weight": a, module + ".lora_B.default.weight": b}
        else:
            wrapped[key] = value
    return wrapped


@pytest.fixture(scope="module")
def emu1(tmp_path_factory):
    """LLaMA's tokenizer in miniature (tokenizer.json alone, and again beside a config.json that names
    <unk> as the pad, as Emu1's models/llama_config does), and a paper-shaped nextmm Emu with every weight
    moved off its initial value."""
    root = tmp_path_factory.mktemp("emu1")
    (root / "llama").mkdir()
    write_metaspace_tokenizer(root / "llama")
    shutil.copytree(root / "llama", root / "llama_config")
    tokenizer, _ = NextTokenizer.from_llm(root / "llama")
    config = {"vocab_size": tokenizer.vocab_size - len(EMU1_ROWS), "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    (root / "llama_config" / "config.json").write_text(json.dumps(config))
    cfg = make_config("emu-14b", overrides=SHRUNK)
    torch.manual_seed(0)
    model = api.build_model(cfg, tokenizer).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
        for block in model.vision.blocks:  # EVA has no key bias; nextmm's zero one computes the same
            block.attn.qkv.bias[cfg.vision.width : 2 * cfg.vision.width] = 0
    return root, tokenizer, model


def checkpoint_folder(root, state, wrap=True):
    """Emu1's released layout: <folder>/multimodal_encoder/pytorch_model.bin beside the diffusers folders."""
    (root / "multimodal_encoder").mkdir(parents=True)
    (root / "unet").mkdir()
    torch.save({"module": state} if wrap else state, root / "multimodal_encoder" / "pytorch_model.bin")
    return root


def convert(capsys, checkpoint, out, tokenizer_dir, *more):
    return run(capsys, "convert", "emu1", str(checkpoint), "--out", str(out), "--tokenizer", str(tokenizer_dir), *SETS, *more)


def interleaved_batch(tokenizer, cfg, scenes):
    builder = SequenceBuilder.for_config(tokenizer, cfg)
    return builder.collate([builder.encode([Text("the quick brown fox"), Image(s.image()), Text(CAPTION, target=True)]) for s in scenes[:2]])


def loss_and_logits(model, batch):
    with torch.no_grad():
        out = model.loss(batch["input_ids"], batch["labels"], batch["pixels"], regression_weight=1.0)
        logits = model.logits(model(batch["input_ids"], model.encode_images(batch["pixels"])))
    return out, logits


def assert_same_model(original, tokenizer, loaded, scenes, atol=0.0):
    """Every weight of `loaded` equals `original`'s (token rows matched by name), and so do the loss and
    logits of one interleaved batch."""
    converted, names = loaded.model.state_dict(), loaded.tokenizer.tok
    assert names.get_vocab() == tokenizer.tok.get_vocab()  # same ids: the batch and the logits' columns agree
    for key, value in original.state_dict().items():
        if key in ("llm.embed_tokens.weight", "llm.lm_head.weight"):
            moved = [names.token_to_id(tokenizer.tok.id_to_token(i)) for i in range(tokenizer.vocab_size)]
            torch.testing.assert_close(converted[key][moved], value, rtol=0, atol=atol, msg=key)
        else:
            torch.testing.assert_close(converted[key], value, rtol=0, atol=atol, msg=key)
    batch = interleaved_batch(tokenizer, original.cfg, scenes)
    assert batch["input_ids"].eq(tokenizer.img_id).any() and batch["labels"].ne(-100).any()
    (want, want_logits), (got, got_logits) = loss_and_logits(original, batch), loss_and_logits(loaded.model, batch)
    for name in ("ce", "l2", "loss"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=atol, msg=name)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=max(atol, 1e-6))


@pytest.mark.parametrize("release", ["Emu", "Emu-I merged"])
def test_the_official_checkpoint_converts_to_the_same_model(emu1, capsys, tmp_path, scenes, release):
    """The pretrained Emu has 4 added rows, so [USER] and [ASSISTANT] start as the mean of LLaMA's rows;
    the original model's rows are set so before its weights are written out."""
    root, tokenizer, model = emu1
    original = api.build_model(model.cfg, tokenizer).eval()
    original.load_state_dict(model.state_dict())
    added = 4 if release == "Emu" else 6
    if added == 4:
        base = tokenizer.vocab_size - len(EMU1_ROWS)
        with torch.no_grad():
            for matrix in (original.llm.embed_tokens.weight, original.llm.lm_head.weight):
                for token in ("[USER]", "[ASSISTANT]"):
                    matrix[tokenizer.tok.token_to_id(token)] = matrix[:base].mean(0)
    folder = checkpoint_folder(tmp_path / "Emu", official_names(original, tokenizer, added))
    code, out, err = convert(capsys, folder, tmp_path / "model", root / "llama")
    assert code == 0, err
    assert "not converted" in out
    loaded = api.load(tmp_path / "model", device="cpu")
    assert loaded.tokenizer.pad == "[PAD]"
    assert_same_model(original, tokenizer, loaded, scenes, atol=1e-7 if added == 4 else 0.0)


def test_emu_i_with_unmerged_lora_converts_to_merged_weights(emu1, capsys, tmp_path, scenes):
    """Emu-instruct.pt: one file, not DeepSpeed-wrapped, the LLM's LoRA unmerged; the tokenizer folder is
    shaped like Emu1's llama_config, whose config.json names <unk> as the pad, and Emu's [PAD] pads still."""
    root, tokenizer, model = emu1
    state = with_lora(official_names(model, tokenizer, 6))
    assert "decoder.lm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in state
    torch.save(state, tmp_path / "Emu-instruct.pt")
    code, _, err = convert(capsys, tmp_path / "Emu-instruct.pt", tmp_path / "model", root / "llama_config")
    assert code == 0, err
    loaded = api.load(tmp_path / "model", device="cpu")
    assert loaded.tokenizer.pad == "[PAD]"
    assert_same_model(model, tokenizer, loaded, scenes, atol=1e-5)


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda s: s.update({"decoder.lm.mystery.weight": torch.zeros(2)}), "decoder.lm.mystery.weight"),
        (lambda s: s.pop("decoder.lm.model.layers.1.mlp.down_proj.weight"), "layers.1.mlp.down_proj.weight"),
        (lambda s: s.pop("visual.blocks.0.attn.v_bias"), "blocks.0.attn.v_bias"),
        (lambda s: s.pop("cformer.cformer.block.1.layer.1.EncDecAttention.k.weight"), "cformer.cformer.block.1.layer.1.EncDecAttention.k.weight"),
    ],
    ids=["unknown key", "missing LLM key", "missing tower key", "missing cformer key"],
)
def test_a_key_too_many_or_too_few_is_named_and_nothing_is_written(emu1, capsys, tmp_path, change, named):
    root, tokenizer, model = emu1
    state = official_names(model, tokenizer, 6)
    change(state)
    code, _, err = convert(capsys, checkpoint_folder(tmp_path / "Emu", state), tmp_path / "model", root / "llama")
    assert_one_clear_line(code, err, named)
    assert not (tmp_path / "model").exists()


def test_a_size_the_checkpoint_does_not_have_is_named(emu1, capsys, tmp_path):
    root, tokenizer, model = emu1
    folder = checkpoint_folder(tmp_path / "Emu", official_names(model, tokenizer, 6))
    code, _, err = convert(capsys, folder, tmp_path / "model", root / "llama", "--set", "llm.mlp_hidden=96")
    assert_one_clear_line(code, err, "mlp.gate_proj.weight", "(128, 64)")
    assert not (tmp_path / "model").exists()


def test_a_tokenizer_of_another_vocabulary_is_named(emu1, capsys, tmp_path):
    root, tokenizer, model = emu1
    other = tmp_path / "other"
    other.mkdir()
    write_metaspace_tokenizer(other, vocab_size=120)
    folder = checkpoint_folder(tmp_path / "Emu", official_names(model, tokenizer, 6))
    code, _, err = convert(capsys, folder, tmp_path / "model", other)
    assert_one_clear_line(code, err, str(other), "tokenizer", "decoder.lm.model.embed_tokens.weight")
    assert not (tmp_path / "model").exists()

import pytest
import torch
from torch import nn
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Stack

from nextmm.config import ResamplerConfig
from nextmm.convert.common import ConvertError, copy_into, read_state_dict
from nextmm.convert.emu1 import cformer_projection_state, cformer_state, merge_lora
from nextmm.models.resampler_t5 import T5Resampler

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

"""Pretrained vision towers: tiny random HF CLIP and SigLIP models saved in their real format, and a synthetic
EVA-CLIP state dict, loaded into nextmm's tower and checked against transformers' forward."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel,
                          ViTConfig, ViTModel)

from nextmm.config import ConfigError, make_config
from nextmm.convert.common import ConvertError, copy_into
from nextmm.convert.eva_clip import eva_state_from_open_clip, eva_vision_config, load_eva_vision
from nextmm.convert.hf_vision import load_hf_vision, vision_config_from_hf, vision_state_from_hf
from nextmm.models.vision import VisionTransformer

TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight random, LayerNorms and biases included, so that a swapped or dropped tensor shows; the
    embeddings small, so that the first LayerNorm's input varies little and a wrong eps shows too."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (1e-3 if "embed" in name else 0.3))
    return model.eval()


def pixels(size: int) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def as_hf_pixels(x: torch.Tensor, cfg) -> torch.Tensor:
    """What an HF image processor gives for the same picture: [0, 1] normalised by the tower's mean and std."""
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    randomised(CLIPVisionModel(CLIPVisionConfig(**TOWER))).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("siglip")
    randomised(SiglipVisionModel(SiglipVisionConfig(**TOWER))).save_pretrained(path)
    return path


def hf_features(model, x, layer: int, post_norm) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[layer]
        return post_norm(hidden) if post_norm is not None else hidden


@pytest.mark.parametrize("layer, final_norm", [(-1, False), (-2, False), (-1, True), (1, True)])
def test_clip_tokens_match_hf_hidden_states(clip_dir, layer, final_norm):
    tower, cfg = load_hf_vision(clip_dir, feature_layer=layer, final_norm=final_norm)
    hf = CLIPVisionModel.from_pretrained(clip_dir).eval()
    x = pixels(cfg.image_size)
    with torch.no_grad():
        ours = tower(x)
    want = hf_features(hf, as_hf_pixels(x, cfg), layer, hf.post_layernorm if final_norm else None)
    assert (tower.cls_tokens, cfg.act, cfg.mean[0]) == (1, "quick_gelu", 0.48145466)
    assert len(tower.blocks) == layer % 4 and (tower.norm is not None) == final_norm
    assert ours.shape == (2, 17, 32) and torch.allclose(ours, want, atol=1e-5)


@pytest.mark.parametrize("layer, final_norm", [(-1, True), (-2, False)])
def test_siglip_tokens_match_hf_hidden_states(siglip_dir, layer, final_norm):
    tower, cfg = load_hf_vision(siglip_dir, feature_layer=layer, final_norm=final_norm)
    hf = SiglipVisionModel.from_pretrained(siglip_dir).eval()
    x = pixels(cfg.image_size)
    with torch.no_grad():
        ours = tower(x)
        if layer == -1 and final_norm:  # SigLIP's own output is every token after post_layernorm
            assert torch.allclose(ours, hf(pixel_values=as_hf_pixels(x, cfg)).last_hidden_state, atol=1e-5)
    want = hf_features(hf, as_hf_pixels(x, cfg), layer, hf.post_layernorm if final_norm else None)
    assert (tower.cls_tokens, cfg.num_tokens, cfg.act) == (0, 16, "gelu_tanh")
    assert ours.shape == (2, 16, 32) and torch.allclose(ours, want, atol=1e-5)


def test_full_clip_model_gives_its_vision_half_with_its_processor_normalisation(tmp_path):
    full = randomised(CLIPModel(CLIPConfig(vision_config=TOWER, text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))))
    full.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}))
    tower, cfg = load_hf_vision(tmp_path, feature_layer=-2)
    assert (cfg.mean, cfg.std, cfg.kind) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6], "clip")
    x = pixels(cfg.image_size)
    with torch.no_grad():
        ours = tower(x)
    assert torch.allclose(ours, hf_features(full.vision_model, as_hf_pixels(x, cfg), -2, None), atol=1e-5)


@pytest.mark.parametrize("kind, defaults", [("clip_vision_model", CLIPVisionConfig()), ("siglip_vision_model", SiglipVisionConfig())])
def test_a_config_json_without_defaults_reads_as_transformers_defaults(kind, defaults):
    cfg = vision_config_from_hf({"model_type": kind})
    assert (cfg.width, cfg.layers, cfg.heads, cfg.image_size, cfg.patch_size, cfg.eps) == (
        defaults.hidden_size, defaults.num_hidden_layers, defaults.num_attention_heads, defaults.image_size, defaults.patch_size, defaults.layer_norm_eps)
    assert round(cfg.width * cfg.mlp_ratio) == defaults.intermediate_size


# EVA01 as EVA's repository and open_clip name it, made from a random HF ViTModel: the same math (linear patch
# embedding with bias, CLS, absolute positions, no pre-norm, erf GELU, final LayerNorm) with q, k, v apart
# and a key bias that is zeroed here, as EVA has none.
EVA = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=52, image_size=28, patch_size=7, layer_norm_eps=1e-6)


def eva_reference() -> tuple[ViTModel, dict[str, torch.Tensor]]:
    vit = randomised(ViTModel(ViTConfig(**EVA), add_pooling_layer=False))
    w = {k: v.clone() for k, v in vit.state_dict().items()}
    state = {"patch_embed.proj.weight": w["embeddings.patch_embeddings.projection.weight"], "patch_embed.proj.bias": w["embeddings.patch_embeddings.projection.bias"],
             "cls_token": w["embeddings.cls_token"], "pos_embed": w["embeddings.position_embeddings"],
             "norm.weight": w["layernorm.weight"], "norm.bias": w["layernorm.bias"], "head.weight": torch.randn(16, 24), "head.bias": torch.randn(16)}
    for i in range(EVA["num_hidden_layers"]):
        hf = f"layers.{i}."
        vit.get_submodule(f"{hf}attention.k_proj").bias.data.zero_()
        state |= {f"blocks.{i}.attn.qkv.weight": torch.cat([w[f"{hf}attention.{p}_proj.weight"] for p in "qkv"]),
                  f"blocks.{i}.attn.q_bias": w[f"{hf}attention.q_proj.bias"], f"blocks.{i}.attn.v_bias": w[f"{hf}attention.v_proj.bias"]}
        for eva, theirs in (("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("attn.proj", "attention.o_proj"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            state |= {f"blocks.{i}.{eva}.{leaf}": w[f"{hf}{theirs}.{leaf}"] for leaf in ("weight", "bias")}
    return vit, state


def tiny_eva(**kw):
    return eva_vision_config(image_size=28, patch_size=7, width=24, layers=2, heads=3, mlp_hidden=52, **kw)


@pytest.mark.parametrize("layer, final_norm", [(-1, False), (-1, True), (-2, False)])
def test_eva_tokens_match_a_vit_with_the_same_math(layer, final_norm):
    vit, state = eva_reference()
    cfg = tiny_eva(feature_layer=layer, final_norm=final_norm)
    tower = VisionTransformer(cfg)
    copy_into(tower, eva_state_from_open_clip(state, cfg), "eva")
    x = pixels(28)
    with torch.no_grad():
        ours = tower(x)
    want = hf_features(vit, as_hf_pixels(x, cfg), layer, vit.layernorm if final_norm else None)
    assert ours.shape == (2, 17, 24) and torch.allclose(ours, want, atol=1e-5)


def test_eva_reads_open_clip_and_emu_prefixes_alike(tmp_path):
    _, state = eva_reference()
    cfg = tiny_eva()
    bare = eva_state_from_open_clip(state, cfg)
    text = {"text.token_embedding.weight": torch.zeros(3, 4), "logit_scale": torch.ones(())}
    for prefix in ("visual.", "visual.trunk."):
        mapped = eva_state_from_open_clip({prefix + k: v for k, v in state.items()} | text, cfg)
        assert mapped.keys() == bare.keys() and all(torch.equal(mapped[k], bare[k]) for k in bare)
    save_file({"visual." + k: v.contiguous() for k, v in state.items()} | text, tmp_path / "eva.safetensors")
    tower = load_eva_vision(tmp_path / "eva.safetensors", cfg)
    assert torch.equal(tower.blocks[1].attn.qkv.bias[24:48], torch.zeros(24))  # EVA has no key bias


def test_default_tower_keeps_its_layout():
    tower = VisionTransformer(make_config("micro").vision)
    assert (tower.cls_tokens, tower.mean, len(tower.blocks)) == (1, None, 1)
    assert sorted(tower.state_dict()) == sorted(
        ["cls", "pos", "norm.weight", "norm.bias"] + [f"patch_embed.{i}.{p}" for i in (0, 1, 3, 4, 6, 7, 9) for p in ("weight", "bias")]
        + [f"blocks.0.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.out", "norm2", "mlp.0", "mlp.2") for p in ("weight", "bias")])


def test_feature_layer_outside_the_tower_is_named():
    with pytest.raises(ConfigError, match="vision.feature_layer 5 is outside a 2-block tower"):
        VisionTransformer(tiny_eva(feature_layer=5))


def test_unsupported_model_type_is_named_with_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip2_vision_model"}))
    with pytest.raises(ConvertError, match="'siglip2_vision_model' is not a vision tower nextmm reads; give one of: clip_vision_model, clip, siglip_vision_model, siglip"):
        load_hf_vision(tmp_path)


def test_missing_and_unexpected_keys_are_listed(clip_dir, tmp_path):
    state = load_file(clip_dir / "model.safetensors")
    del state["encoder.layers.0.mlp.fc1.bias"]
    state["encoder.layers.0.extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(ConvertError, match=r"missing blocks\.0\.mlp\.0\.bias; unexpected encoder\.layers\.0\.extra\.weight"):
        load_hf_vision(tmp_path)
    _, eva = eva_reference()
    eva["rope.freqs_cos"] = torch.zeros(1)  # EVA02's rotary embeddings, which EVA01 does not have
    cfg = tiny_eva()
    with pytest.raises(ConvertError, match=r"unexpected rope\.freqs_cos"):
        copy_into(VisionTransformer(cfg), eva_state_from_open_clip(eva, cfg), "eva")


def test_wrong_shape_is_named():
    _, state = eva_reference()
    cfg = eva_vision_config(image_size=28, patch_size=7, width=24, layers=2, heads=3, mlp_hidden=48)
    with pytest.raises(ConvertError, match=r"tensor 'blocks\.\d\.mlp\.0\.(weight|bias)' has shape \(52"):
        copy_into(VisionTransformer(cfg), eva_state_from_open_clip(state, cfg), "eva")


def test_image_size_mismatch_names_both_sizes(clip_dir):
    state = load_file(clip_dir / "model.safetensors")
    cfg = vision_config_from_hf(json.loads((clip_dir / "config.json").read_text()))
    cfg.image_size = 48
    with pytest.raises(ConvertError, match="clip has position embeddings for 32 px images but the config asks for 48 px; set image_size to 32"):
        vision_state_from_hf(state, cfg, source="clip")
    _, eva = eva_reference()
    with pytest.raises(ConvertError, match="has position embeddings for 28 px images but the config asks for 35 px; set image_size to 28"):
        eva_state_from_open_clip(eva, eva_vision_config(image_size=35, patch_size=7, width=24, layers=2, heads=3, mlp_hidden=52))

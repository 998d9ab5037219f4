import pytest
import torch

from nextmm.config import ConfigError, make_config, parse_override
from nextmm.models.emu import Emu


def count_params(cfg, vocab: int) -> int:
    cfg.llm.vocab_size = vocab
    with torch.device("meta"):
        model = Emu(cfg, image_token_id=5)
    return sum(p.numel() for p in model.parameters())


def test_micro_preset_is_under_one_million_parameters():
    assert count_params(make_config("micro"), 400) < 1_000_000


def test_presets_grow_in_size():
    sizes = [count_params(make_config(p), 600) for p in ("micro", "tiny", "small")]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_emu_14b_has_the_papers_shapes():
    cfg = make_config("emu-14b")
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.num_tokens) == (224, 14, 257)
    assert cfg.resampler.num_queries == 32 and cfg.resampler.layers == 12
    total = count_params(cfg, 32000)
    # EVA-CLIP ViT-g (~1.0B) + LLaMA-13B (~13.0B) + causal transformer: about 14B.
    assert 13.5e9 < total < 15.0e9


def test_yaml_then_overrides_apply_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: micro\npretrain:\n  lr: 0.01\n  mix: {caption: 1}\nllm:\n  layers: 3\n")
    cfg = make_config("tiny", path, ["pretrain.lr=2e-4", "llm.max_seq_len=64"])
    assert cfg.preset == "micro"
    assert cfg.pretrain.lr == pytest.approx(2e-4)
    assert cfg.pretrain.mix == {"caption": 1}
    assert (cfg.llm.layers, cfg.llm.max_seq_len, cfg.llm.width) == (3, 64, 64)


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: make_config("huge"), "unknown preset 'huge'"),
        (lambda: make_config("tiny", overrides=["pretrain.lrr=1"]), "unknown config key 'pretrain.lrr'"),
        (lambda: make_config("tiny", overrides=["pretrain.lr=fast"]), "expects a float"),
        (lambda: make_config("tiny", overrides=["pretrain"]), "section.key=value"),
        (lambda: make_config("tiny", "/nonexistent.yaml"), "does not exist"),
        (lambda: make_config("tiny", overrides=["clip.precision=fp16"]), "'clip.precision' is 'fp16'; set it to one of auto, bf16, fp32"),
        (lambda: make_config("tiny", overrides=["resampler.seed=max"]), "'resampler.seed' is 'max'; set it to one of regions, none"),
        (lambda: make_config("tiny", overrides=["decoder.prediction_type=x0"]),
         "'decoder.prediction_type' is 'x0'; set it to one of epsilon, v_prediction"),
        (lambda: make_config("tiny", overrides=["decoder.snr_gamma=-1"]), "'decoder.snr_gamma' is -1.0; set it to 0"),
        (lambda: make_config("tiny", overrides=["decoder.regressed_condition=1.5"]), "'decoder.regressed_condition' is 1.5; set it to a share from 0"),
        (lambda: make_config("tiny", overrides=["decoder.semantic_grid=3"]), "'decoder.semantic_grid' is 3; set it to 0 (the whole picture alone. or a divisor of the vision tower's 8 patches a side"),
        (lambda: make_config("tiny", overrides=["decoder.semantic_pictures=4"]), "'decoder.semantic_pictures' is 4; fitting the semantic token's read-out needs 16"),
        (lambda: make_config("tiny", overrides=["pretrain.mix.ground.x=1"]), "'pretrain.mix' maps names to values; set one entry as pretrain.mix.NAME=VALUE"),
        (lambda: make_config("tiny", overrides=["pretrain.presence_lr_scale=-10"]), "'pretrain.presence_lr_scale' is -10.0; set it to 0 (frozen. or a positive multiplier"),
    ],
)
def test_config_mistakes_are_explained(call, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        call()


def test_override_parses_yaml_values():
    assert parse_override("pretrain.mix={caption: 2}") == {"pretrain": {"mix": {"caption": 2}}}


def test_an_override_into_a_mapping_changes_one_entry_and_a_whole_mapping_replaces_it():
    default = make_config("tiny").pretrain.mix
    one = make_config("tiny", overrides=["pretrain.mix.ground=2", "pretrain.mix.story=0"]).pretrain.mix
    assert one == {**default, "ground": 2, "story": 0}
    assert make_config("tiny", overrides=["pretrain.mix={caption: 1, vqa: 2}"]).pretrain.mix == {"caption": 1, "vqa": 2}
    assert make_config("tiny", overrides=["data.counts.ground=5"]).data.counts["caption"] == make_config("tiny").data.counts["caption"]

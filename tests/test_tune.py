"""Instruction tuning (train/tune.py, `nextmm tune`): LoRA through peft or full fine-tuning on conversations,
saved merged or as peft's adapter folder, which `nextmm.load` applies."""

import json

import pytest
import torch
from safetensors.torch import load_file

from nextmm import api
from nextmm.cli import main
from nextmm.config import ConfigError, make_config
from nextmm.data.sample import Image, Text, conversation_sample
from nextmm.data.shards import ShardWriter
from nextmm.train import tune as tuning
from nextmm.worlds.shapes import generator as shapes

FEW_STEPS = ["tune.steps=6", "tune.batch_size=4", "tune.lr=1e-2", "tune.warmup_steps=0", "tune.time_budget_s=0", "tune.log_every=1", "tune.lora_rank=4", "tune.precision=fp32"]


def conversations(n: int) -> list:
    """Describe-the-picture chats, every third one also asking for a drawing (the assistant's picture is regressed)."""
    out = []
    for i, sample in enumerate(shapes.make_samples("caption", 5, n)):
        picture, caption = sample.segments[0].image, sample.segments[1].text
        turns = [("user", [Image(picture), Text("describe the picture.")]), ("assistant", [Text(caption)])]
        if i % 3 == 0:
            turns += [("user", [Text(f"draw {caption}.")]), ("assistant", [Image(picture)])]
        out.append(conversation_sample(f"chat-{i}", turns))
    return out


@pytest.fixture()
def chats(tmp_path):
    with ShardWriter(tmp_path / "chats", prefix="conversation") as writer:
        for sample in conversations(8):
            writer.write(sample)
    return tmp_path / "chats"


@pytest.fixture()
def model_dir(tmp_path, micro_nextmm):
    return micro_nextmm.save(tmp_path / "base")


def logits(m: api.NextMM) -> torch.Tensor:
    """The LM head's scores over a conversation with a picture, in eval mode."""
    sample = conversations(1)[0]
    batch = m.builder.collate([m.builder.encode(sample.segments)])
    m.model.eval()
    with torch.no_grad():
        visual = m.model.encode_images(batch["pixels"])
        return m.model.logits(m.model(batch["input_ids"], visual))


def tuned(model_dir, chats, tmp_path, settings, name="out"):
    return tuning.tune(model_dir, chats, tmp_path / name, [*FEW_STEPS, *settings], device="cpu")


def text_loss(m: api.NextMM, samples) -> float:
    """The cross-entropy of the assistant's text over the samples in one batch, in eval mode."""
    batch = m.builder.collate([m.builder.encode(s.segments) for s in samples])
    m.model.eval()
    with torch.no_grad():
        return float(m.model.loss(batch["input_ids"], batch["labels"], batch["pixels"], drawn=batch["drawn"])["ce"])


def test_lora_trains_the_adapters_alone_and_the_loss_falls(model_dir, chats, tmp_path):
    m = api.load(model_dir, device="cpu")
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    start = text_loss(m, conversations(8))
    cfg = tuning.apply_overrides(m.config, FEW_STEPS)
    adapted, result = tuning.fine_tune(m, cfg, tuning.discover_sources(chats), tmp_path / "run", model_dir)
    assert result.step == 6 and text_loss(m, conversations(8)) < start - 0.2  # 5.42 -> 5.02 nats
    after = adapted.get_base_model().state_dict()
    lora = {k for k in after if ".lora_" in k}
    assert len(lora) == 2 * 4 * m.config.llm.layers  # A and B of q, k, v, o in every block
    assert all(not torch.equal(after[k], torch.zeros_like(after[k])) for k in lora if ".lora_B." in k)
    base = {k.replace(".base_layer", ""): v for k, v in after.items() if k not in lora}
    assert base.keys() == before.keys()
    assert [k for k in before if not torch.equal(before[k], base[k])] == []  # bit for bit, buffers too


def test_the_merged_model_gives_the_adapted_models_logits(model_dir, chats, tmp_path):
    m = api.load(model_dir, device="cpu")
    cfg = tuning.apply_overrides(m.config, FEW_STEPS)
    adapted, _ = tuning.fine_tune(m, cfg, tuning.discover_sources(chats), tmp_path / "out" / "tune", model_dir)
    with_adapters = logits(m)
    merged = api.load(tuning.save_tuned(m, adapted, cfg, tmp_path / "out", model_dir), device="cpu")
    assert not any(".lora_" in k or "base_layer" in k for k in merged.model.state_dict())
    assert torch.allclose(logits(merged), with_adapters, atol=1e-5)
    assert not torch.allclose(with_adapters, logits(api.load(model_dir, device="cpu")), atol=1e-3)  # it did learn
    assert (tmp_path / "out" / "tune" / "done.json").is_file()  # the run folder is kept beside the model


def test_the_adapter_folder_is_pefts_and_loads_as_the_merged_model(model_dir, chats, tmp_path):
    merged = tuned(model_dir, chats, tmp_path, [], "merged")
    adapter = tuned(model_dir, chats, tmp_path, ["tune.save=adapter"], "adapter")
    folder = tmp_path / "adapter"
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "nextmm_base.json"]
    settings = json.loads((folder / "adapter_config.json").read_text())
    assert settings["peft_type"] == "LORA" and settings["r"] == 4 and settings["base_model_name_or_path"] == str(model_dir.resolve())
    keys = load_file(str(folder / "adapter_model.safetensors"))
    assert keys and all(k.startswith("base_model.model.llm.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    # the same run, saved both ways: one model
    assert torch.allclose(logits(api.load(adapter["model"], device="cpu")), logits(api.load(merged["model"], device="cpu")), atol=1e-5)
    # and peft itself reads the folder back onto the base model
    from peft import PeftModel

    base = api.load(model_dir, device="cpu")
    PeftModel.from_pretrained(base.model, folder)
    assert torch.allclose(logits(base), logits(api.load(folder, device="cpu")), atol=1e-5)
    # an adapter folder is a model to tune further, too
    again = tuned(folder, chats, tmp_path, ["tune.steps=1"], "again")
    assert not torch.allclose(logits(api.load(again["model"], device="cpu")), logits(base), atol=1e-4)
    # the base model trained again in place: its adapter says so rather than folding into other weights
    with torch.no_grad():
        base = api.load(model_dir, device="cpu")
        base.model.llm.layers[0].self_attn.q_proj.weight.add_(0.01)
    base.save(model_dir)
    with pytest.raises(api.ModelDirError, match="tuned on other weights than those now in"):
        api.load(folder, device="cpu")


def test_full_tuning_changes_the_llm_and_nothing_else(model_dir, chats, tmp_path):
    before = api.load(model_dir, device="cpu").model.state_dict()
    after = api.load(tuned(model_dir, chats, tmp_path, ["tune.full=true"])["model"], device="cpu").model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("llm.layers.") for k in changed) and any(k.startswith("regression_head.") for k in changed)
    assert all(k.startswith(("llm.", "regression_head.")) for k in changed)


def test_the_causal_transformer_trains_too_when_asked(model_dir, chats, tmp_path):
    before = api.load(model_dir, device="cpu").model.state_dict()
    out = tuned(model_dir, chats, tmp_path, ["tune.train_resampler=true", "tune.save=adapter"])
    assert any(k.startswith("base_model.model.resampler.") for k in load_file(str(tmp_path / "out" / "adapter_model.safetensors")))
    after = api.load(out["model"], device="cpu").model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"llm", "resampler", "visual_proj"}


def test_a_lora_target_the_model_lacks_is_one_sentence(model_dir, chats, tmp_path, capsys):
    code = main(["tune", "--model", str(model_dir), "--data", str(chats), "--out", str(tmp_path / "o"), "--set", "tune.lora_targets=[q_proj,qkv]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "'qkv'" in err and "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("setting, words", [
    ("tune.save=both", "tune.save"), ("tune.lora_rank=0", "tune.lora_rank"), ("tune.lora_dropout=1", "tune.lora_dropout"),
    ("tune.lora_targets=[]", "tune.lora_targets"),
])
def test_bad_tune_settings_are_one_sentence(setting, words):
    with pytest.raises(ConfigError, match=words):
        make_config("micro", overrides=[setting])
    with pytest.raises(ConfigError, match="tune.full"):
        make_config("micro", overrides=["tune.full=true", "tune.save=adapter"])


def test_the_cli_tunes_a_model_into_a_loadable_directory_and_resumes(model_dir, chats, tmp_path, capsys):
    out = tmp_path / "tuned"
    argv = ["tune", "--model", str(model_dir), "--data", str(chats), "--out", str(out), "--steps", "3", "--device", "cpu",
            *sum((["--set", s] for s in FEW_STEPS[1:]), [])]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and str(out / "tune") in printed
    m = api.load(out, device="cpu")
    assert m.config.tune.steps == 3 and m.decoder is None and (out / "tune" / "done.json").is_file()
    assert m.complete([["describe the picture."]], max_new_tokens=4)
    # resumed with more steps it continues from its checkpoint rather than starting again
    assert main([*argv, "--resume", "--steps", "5"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "tune" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    # a checkpoint keeps the adapters it trains, not the frozen base that --model gives again
    (kept,) = [p for p in (out / "tune" / "checkpoints").glob("step-*") if p.name.endswith("5")]
    names = set(load_file(str(kept / "model.safetensors")))
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 4 * make_config("micro").llm.layers  # A and B of q, k, v, o in every block
    tuned_again = api.load(out, device="cpu")
    assert main([*argv, "--resume", "--steps", "5"]) == 0  # finished: its adapters loaded from the checkpoint, the same model written
    assert torch.equal(logits(api.load(out, device="cpu")), logits(tuned_again))
    assert main(["tune", "--model", str(model_dir), "--data", str(chats), "--out", str(out), "--set", "llm.layers=3"]) == 2
    assert "llm.layers=3" in capsys.readouterr().err
    assert main(["tune", "--model", str(model_dir), "--data", str(chats), "--out", str(model_dir)]) == 2
    assert "is the model being tuned" in capsys.readouterr().err and api.load(model_dir, device="cpu")

"""A model from pretrained parts: `nextmm init` joins a Hugging Face LLM and vision tower, the result
continues text exactly as the LLM alone does, trains with `nextmm train --init`, and `nextmm export` gives
the LLM back to transformers."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig, CLIPVisionModel

from nextmm import api
from nextmm.cli import main
from nextmm.data.make import write_shapes
from test_convert_llm import save_tiny_hf, write_metaspace_tokenizer

SMALL_RESAMPLER = ["resampler.width=32", "resampler.layers=1", "resampler.heads=2", "resampler.head_width=16", "resampler.num_queries=4"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    hf_llm, llm_dir = save_tiny_hf(root, "llama", {})
    write_metaspace_tokenizer(llm_dir)
    torch.manual_seed(1)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8))
    tower.save_pretrained(root / "clip")
    return hf_llm, llm_dir, root / "clip"


@pytest.fixture(scope="module")
def model_dir(parts, tmp_path_factory):
    _, llm_dir, vision_dir = parts
    out = tmp_path_factory.mktemp("init") / "model"
    assert main(["init", "--llm", str(llm_dir), "--vision", str(vision_dir), "--out", str(out), *sum((["--set", s] for s in SMALL_RESAMPLER), [])]) == 0
    return out


def test_init_keeps_the_llm_and_grows_its_vocabulary_by_emus_tokens(parts, model_dir):
    hf_llm, _, _ = parts
    weights = load_file(str(model_dir / "model.safetensors"))
    embeddings = hf_llm.model.embed_tokens.weight.detach()
    grown = weights["llm.embed_tokens.weight"]
    assert torch.equal(grown[: len(embeddings)], embeddings)
    added = grown[len(embeddings):]
    assert len(added) >= 3 and torch.allclose(added, embeddings.mean(0).expand_as(added), atol=1e-6)
    parts_of = {name.split(".")[0] for name in weights}
    assert parts_of == {"vision", "ln_visual", "resampler", "visual_proj", "llm", "regression_head"}


def test_an_initialised_model_continues_text_as_the_llm_alone(parts, model_dir):
    hf_llm, llm_dir, _ = parts
    m = api.load(model_dir, device="cpu")
    prompt = "the quick brown fox"
    hf_tok = AutoTokenizer.from_pretrained(llm_dir)
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    out = hf_llm.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.eos_token_id)
    new = out[0, ids.shape[1]:]
    assert len(set(new.tolist())) > 3, "the random LLM repeats itself: the comparison would prove little"
    assert m.complete([[prompt]], max_new_tokens=10) == [hf_tok.decode(new, skip_special_tokens=True).strip()]


def test_an_initialised_model_reads_pictures(model_dir, scenes):
    m = api.load(model_dir, device="cpu")
    captions = m.caption([s.image() for s in scenes[:2]], max_new_tokens=4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_train_from_an_initialised_model_trains_the_llm_and_keeps_a_frozen_tower(model_dir, tmp_path):
    data = tmp_path / "data"
    write_shapes(data, {"caption": 40}, seed=0, shard_size=40)
    run = tmp_path / "run"
    code = main(["train", "--init", str(model_dir), "--data", str(data), "--out", str(run), "--device", "cpu",
                 "--set", "pretrain.steps=3", "--set", "pretrain.time_budget_s=0", "--set", "pretrain.batch_size=4",
                 "--set", "pretrain.warmup_steps=1", "--set", "pretrain.vision_lr_scale=0"])
    assert code == 0
    before, after = load_file(str(model_dir / "model.safetensors")), load_file(str(run / "model" / "model.safetensors"))
    assert torch.equal(before["vision.blocks.0.attn.qkv.weight"], after["vision.blocks.0.attn.qkv.weight"])
    assert not torch.equal(before["llm.layers.0.mlp.up_proj.weight"], after["llm.layers.0.mlp.up_proj.weight"])
    assert not (run / "clip").exists()  # a pretrained tower has no stage 0
    logged = [json.loads(line) for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert logged and all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)
    assert api.load(run / "model", device="cpu").caption([], max_new_tokens=2) == []


def test_export_gives_transformers_the_llm_with_emus_tokens(parts, model_dir, tmp_path):
    hf_llm, _, _ = parts
    out = tmp_path / "hf"
    assert main(["export", "--model", str(model_dir), "--llm-out", str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        ours, original = exported(ids).logits, hf_llm(ids).logits
    assert ours.shape[-1] > original.shape[-1]  # Emu's tokens came along
    assert torch.allclose(ours[..., : original.shape[-1]], original, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("[IMG]") >= original.shape[-1]


def test_init_with_an_unsupported_llm_says_so_and_writes_nothing(parts, tmp_path, capsys):
    _, llm_dir, vision_dir = parts
    bad = tmp_path / "gpt2"
    bad.mkdir()
    config = json.loads((llm_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (bad / name).write_bytes((llm_dir / name).read_bytes())
    out = tmp_path / "model"
    assert main(["init", "--llm", str(bad), "--vision", str(vision_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err and "Traceback" not in err
    assert not out.exists()


def test_train_init_refuses_another_architecture(model_dir, tmp_path, capsys):
    code = main(["train", "--init", str(model_dir), "--preset", "small", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "--init" in err and "--set" in err and not (tmp_path / "run").exists()

"""The `emu-14b` preset is the paper's Emu and nothing more: its parts are the tower, Emu's LayerNorm, the
T5-style causal transformer, the projection, the LLM and a bias-free regression head in the LLM's width."""

import torch

from nextmm.api import build_model
from nextmm.config import make_config
from nextmm.data.sample import Image, Text
from nextmm.data.sequence import SequenceBuilder
from nextmm.models.resampler_t5 import T5Resampler

PAPER_PARTS = {"vision", "ln_visual", "resampler", "visual_proj", "llm", "regression_head"}
SHRUNK = [  # the paper's layout at a size a test can build
    "vision.image_size=28", "vision.width=32", "vision.layers=1", "vision.heads=2", "resampler.width=32",
    "resampler.layers=2", "resampler.heads=2", "resampler.head_width=16", "resampler.num_queries=4", "llm.width=64",
    "llm.layers=2", "llm.heads=2", "llm.mlp_hidden=128", "llm.max_seq_len=64",
]


def paper_model(tokenizer):
    cfg = make_config("emu-14b", overrides=SHRUNK)
    torch.manual_seed(0)
    return cfg, build_model(cfg, tokenizer)


def test_the_paper_preset_builds_only_the_papers_parts(tokenizer):
    cfg, model = paper_model(tokenizer)
    parts = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert parts == PAPER_PARTS and {name.split(".")[0] for name in model.state_dict()} == PAPER_PARTS
    assert len(model.heads) == 0  # no extra head, so no hook adds anything
    assert isinstance(model.resampler, T5Resampler) and model.resampler.queries.shape == (4, 32)
    assert model.regression_head.weight.shape == (64, 64) and model.regression_head.bias is None
    assert cfg.visual_width == cfg.llm.width


def test_the_paper_model_regresses_projected_embeddings_and_reads_them_unprojected(tokenizer, scenes):
    cfg, model = paper_model(tokenizer)
    builder = SequenceBuilder.for_config(tokenizer, cfg)
    batch = builder.collate([builder.encode([Image(s.image()), Text(s.caption(), target=True)]) for s in scenes[:2]])
    pixels = batch["pixels"]
    visual = model.encode_images(pixels)
    tokens = model.ln_visual(model.vision(pixels))
    assert torch.allclose(visual, model.visual_proj(model.resampler(tokens)), atol=1e-6)
    embeds = model.embed(batch["input_ids"], visual)
    slots = batch["input_ids"] == tokenizer.image_id
    assert torch.equal(embeds[slots], visual.reshape(-1, cfg.llm.width))  # the slots hold the projected embeddings as they are
    out = model.loss(batch["input_ids"], batch["labels"], pixels, regression_weight=1.0)
    assert set(out) >= {"ce", "l2", "loss"} and torch.isfinite(out["loss"])

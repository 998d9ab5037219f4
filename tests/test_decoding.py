"""Decoding with a KV cache computes what re-running the whole sequence computes, at every step.

The model here has every parameter after the image encoder (the LLM and the heads that join it) moved by
N(0, 0.3), so its greedy continuation changes from step to step: a model that writes one token over and
over hides a cache that reads the wrong positions, since wrong logits still pick that token. It uses
grouped-query attention (four query heads share two key/value heads), and the prompts have four lengths,
so the batch is left-padded by a different amount in each row.
"""

import numpy as np
import pytest
import torch

from nextmm.api import build_model
from nextmm.config import make_config
from nextmm.data.sample import Image, Text, Video
from nextmm.data.sequence import SequenceBuilder
from nextmm.generate import Stepper
from nextmm.models.llm import KVCache, LLaMA
from nextmm.worlds.shapes import generator as shapes

STEPS = 8
GQA = ["llm.heads=4", "llm.kv_heads=2"]


@pytest.fixture(scope="module")
def varied(tokenizer):
    cfg = make_config("micro", overrides=GQA)
    cfg.llm.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # a perturbed image encoder magnifies rounding (how a batch is blocked) into visible changes
            if not name.startswith(("vision.", "resampler.")):
                param.add_(torch.randn_like(param) * 0.3)
    return model, SequenceBuilder.for_config(tokenizer, cfg)


@pytest.fixture(scope="module")
def prompts():
    scenes = [shapes.sample_scene(np.random.default_rng([3, i])) for i in range(5)]
    return [
        [Image(scenes[0].image())],
        [Image(scenes[1].image()), Text("question: what color is the circle? answer:", target=False)],
        [Video([s.image() for s in scenes[2:5]]), Text("a large", target=False)],
        [Text("this is a", target=False)],
    ]


def decode(model, builder, prompts, use_cache: bool, precision: str = "fp32", tokens: torch.Tensor | None = None):
    """Greedy decoding for STEPS steps; given `tokens` (B, STEPS), another run's choices, it feeds those
    instead, so that two runs read the same sequence. Returns the next-token probabilities at every step
    (STEPS, B, vocabulary) in fp32, the tokens chosen (B, STEPS) and the stepper.

    Probabilities rather than logits are compared: with the copy head the logits are log-probabilities,
    whose far tail (around -30) rounds differently in two correct runs."""
    batch = builder.collate([builder.encode(p, close=False) for p in prompts], left_pad=True)
    stepper = Stepper(model, batch, STEPS - 1, use_cache, precision)
    probs, chosen = [], []
    with torch.no_grad(), stepper.casting():  # as generate_ids decodes
        hidden = stepper.prefill()
        for step in range(STEPS):
            probs.append(stepper.logits(hidden).float().softmax(-1))
            chosen.append(probs[-1].argmax(-1) if tokens is None else tokens[:, step])
            if step < STEPS - 1:
                hidden = stepper.append_token(chosen[-1])
    return torch.stack(probs), torch.stack(chosen, dim=1), stepper


@pytest.fixture(scope="module")
def reference(varied, prompts):
    """Re-running the whole sequence at every step in fp32: what every cached run must reproduce."""
    model, builder = varied
    probs, tokens, _ = decode(model, builder, prompts, use_cache=False)
    return probs, tokens


def test_the_reference_decoding_writes_varied_tokens(reference):
    _, tokens = reference
    assert all(len(set(row)) >= 4 for row in tokens.tolist()), tokens


def test_an_fp32_cache_gives_the_recomputed_probabilities_at_every_step(varied, prompts, reference):
    model, builder = varied
    probs, tokens = reference
    cached, _, _ = decode(model, builder, prompts, use_cache=True, tokens=tokens)
    # the two paths sum in different orders: about 1e-6 apart, while a misplaced cache entry moves them by 0.5 or more
    torch.testing.assert_close(cached, probs, atol=1e-4, rtol=0)


def test_a_bf16_cache_gives_the_bf16_recomputed_probabilities_at_every_step(varied, prompts, reference):
    model, builder = varied
    _, tokens = reference
    cached, _, stepper = decode(model, builder, prompts, use_cache=True, precision="bf16", tokens=tokens)
    recomputed, _, _ = decode(model, builder, prompts, use_cache=False, precision="bf16", tokens=tokens)
    assert stepper.cache.keys[0].dtype == torch.bfloat16
    # both runs round the same values to bf16; only the order of a few sums differs
    torch.testing.assert_close(cached, recomputed, atol=1e-3, rtol=0)


def test_a_bf16_cache_stays_within_bf16_rounding_of_fp32_recompute(varied, prompts, reference):
    model, builder = varied
    probs, tokens = reference
    cached, _, _ = decode(model, builder, prompts, use_cache=True, precision="bf16", tokens=tokens)
    # bf16 keeps 8 significant bits; through this deliberately sensitive model its probabilities move by
    # up to about 0.05, while a cache entry read at the wrong place moves them by 0.5 or more
    torch.testing.assert_close(cached, probs, atol=0.15, rtol=0)


def test_bf16_decoding_casts_each_weight_once_not_at_every_step(varied, prompts):
    model, builder = varied
    gate = model.llm.layers[0].mlp.gate_proj.weight  # gate and up projections: the only weights of their shape
    with torch.profiler.profile(record_shapes=True) as prof:
        decode(model, builder, prompts, use_cache=True, precision="bf16")
    casts = sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                if e.key == "aten::_to_copy" and e.input_shapes and e.input_shapes[0] == list(gate.shape))
    assert casts == 2 * len(model.llm.layers)


def test_each_row_of_a_left_padded_batch_decodes_as_its_prompt_alone(varied, prompts, reference):
    model, builder = varied
    probs, tokens = reference
    for row, prompt in enumerate(prompts):
        alone, _, _ = decode(model, builder, [prompt], use_cache=True, tokens=tokens[row : row + 1])
        # a batch of one sums in another order, which this sensitive model magnifies to a few 1e-5
        torch.testing.assert_close(alone[:, 0], probs[:, row], atol=1e-3, rtol=0)


def test_llama_fed_one_token_at_a_time_through_its_cache_gives_the_full_sequence_hidden_states():
    cfg = make_config("micro", overrides=GQA).llm
    cfg.vocab_size = 16
    torch.manual_seed(0)
    llm = LLaMA(cfg).eval()
    llm.reset_parameters(std=0.1)  # five times the usual scale, so attention moves the hidden states visibly
    x = torch.randn(2, 12, cfg.width)
    with torch.no_grad():
        full = llm(x)
        cache = KVCache(cfg, batch=2, max_len=12, dtype=torch.float32)
        stepped = [llm(x[:, t : t + 1], positions=torch.full((2, 1), t), cache=cache) for t in range(12)]
    torch.testing.assert_close(torch.cat(stepped, dim=1), full, atol=1e-5, rtol=0)

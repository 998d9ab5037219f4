"""Emu's image generation loop: N visual embeddings regressed one at a time, batched, with a KV cache."""

import pytest
import torch

from nextmm.data.sample import Image, Text
from nextmm.data.sequence import SequenceTooLong
from nextmm.generate import generate_visual
from test_model import builder_for, prompts_for


def test_cached_loop_gives_the_same_embeddings_as_full_recompute(micro_model, tokenizer, scenes):
    b = builder_for(micro_model, tokenizer)
    prompts = prompts_for(scenes)
    cached = generate_visual(micro_model, b, prompts, use_cache=True)
    recomputed = generate_visual(micro_model, b, prompts, use_cache=False)
    assert cached.shape == (len(prompts), micro_model.num_queries, micro_model.cfg.resampler.width)
    torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=1e-4)
    assert cached.std(0).mean() > 1e-4  # different prompts, different images


def test_a_padded_batch_regresses_like_each_prompt_alone(micro_model, tokenizer, scenes):
    b = builder_for(micro_model, tokenizer)
    prompts = prompts_for(scenes)
    batched = generate_visual(micro_model, b, prompts)
    alone = torch.cat([generate_visual(micro_model, b, [p]) for p in prompts])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


def test_each_embedding_is_what_training_would_predict_from_the_ones_before(micro_model, tokenizer, scenes):
    """The loop's semantics match the loss: placed in an image block, the regressed embeddings are
    exactly what the regression head predicts at `[IMG]` and at each `<image>` but the last."""
    b = builder_for(micro_model, tokenizer)
    prompt = [Image(scenes[0].image()), Text("make the red circle blue", target=False)]
    regressed = generate_visual(micro_model, b, [prompt])
    e = b.encode(prompt, close=False)
    e.add(b.image_block())
    batch = b.collate([e])
    visual = torch.cat([micro_model.encode_images(batch["pixels"]), regressed])
    with torch.no_grad():
        hidden = micro_model(batch["input_ids"], visual)
        ids = batch["input_ids"][0]
        start = len(ids) - micro_model.num_queries - 2  # the last image's [IMG]
        predicted = micro_model.regression_head(hidden[0, start : start + micro_model.num_queries])
    torch.testing.assert_close(predicted, regressed[0], atol=1e-5, rtol=1e-4)


def test_a_prompt_with_no_room_for_its_image_is_one_clear_error(micro_model, tokenizer):
    b = builder_for(micro_model, tokenizer)
    words = 1
    while len(b.encode([Text("circle " * (words + 1), target=False)], close=False).ids) + 1 < b.max_len:
        words += 1  # the longest prompt that fits with its [IMG] but leaves no room for the embeddings
    with pytest.raises(SequenceTooLong, match="its image needs"):
        generate_visual(micro_model, b, [[Text("circle " * words, target=False)]])

"""Emu's image generation loop: N visual embeddings regressed one at a time, batched, with a KV cache."""

import pytest
import torch

from nextmm.api import build_model
from nextmm.data.sample import Image, Text
from nextmm.data.sequence import SequenceTooLong
from nextmm.generate import generate_visual
from test_model import builder_for, prompts_for


@pytest.fixture()
def words_model(micro_config, tokenizer):
    """The micro model with heads.words_to_visual."""
    micro_config.heads.words_to_visual = True
    torch.manual_seed(0)
    return build_model(micro_config, tokenizer)


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


def test_each_embedding_is_what_training_would_predict_from_the_ones_before(words_model, tokenizer, scenes):
    """The loop's semantics match the loss: placed in an image block, the regressed embeddings are
    exactly what the regression head predicts at `[IMG]` and at each `<image>` but the last."""
    b = builder_for(words_model, tokenizer)
    with torch.no_grad():
        torch.nn.init.normal_(words_model.heads.words_to_visual.weight, std=0.3)  # the prompt's words regress too
    prompt = [Image(scenes[0].image()), Text("make the red circle blue", target=False)]
    regressed = generate_visual(words_model, b, [prompt])
    torch.testing.assert_close(regressed, generate_visual(words_model, b, [prompt], use_cache=False), atol=1e-5, rtol=1e-4)
    e = b.encode(prompt, close=False)
    e.add(b.image_block())
    batch = b.collate([e])
    visual = torch.cat([words_model.encode_images(batch["pixels"]), regressed])
    with torch.no_grad():
        hidden = words_model(batch["input_ids"], visual)
        ids = batch["input_ids"]
        at, slots = words_model.regression_rows(ids)
        n = words_model.num_queries
        start = ids.shape[1] - n - 2  # the last image's [IMG]
        assert at[-n:, 1].tolist() == list(range(start, start + n)) and slots[-n:].tolist() == list(range(n))
        reading = words_model.read(ids, visual)
        predicted = words_model.heads.regress(reading, at, slots, words_model.regress(hidden[tuple(at.T)]))[-n:]
        bags = reading.word_bags[0, start].expand(n, -1)  # the words before it, at [IMG]
        without_words = words_model.regress(hidden[0, start : start + n])
        torch.testing.assert_close(predicted, without_words + words_model.heads.words_to_visual.by_slot(bags, torch.arange(n)))
    torch.testing.assert_close(predicted, regressed[0], atol=1e-5, rtol=1e-4)
    assert (predicted - without_words).abs().max() > 1e-3


def test_the_prompts_words_learn_to_regress_the_picture_they_describe(words_model, tokenizer):
    from nextmm.data.sample import caption_sample
    from nextmm.eval.images import held_out_scenes
    from nextmm.train.stages import text_first

    b = builder_for(words_model, tokenizer)
    pairs = held_out_scenes(1, 64, seed=5)
    batch = b.collate([b.encode(text_first(caption_sample(f"k{i}", image, caption)).segments) for i, (caption, image) in enumerate(pairs)])
    optimizer = torch.optim.Adam([words_model.heads.words_to_visual.weight], lr=0.01)
    losses = []
    for _ in range(60):
        out = words_model.loss(batch["input_ids"], batch["labels"], batch["pixels"])
        optimizer.zero_grad()
        out["l2"].backward()
        optimizer.step()
        losses.append(out["l2"].item())
    assert losses[-1] < 0.7 * losses[0]  # the LLM itself did not move: only the words' map learned


def test_a_prompt_with_no_room_for_its_image_is_one_clear_error(micro_model, tokenizer):
    b = builder_for(micro_model, tokenizer)
    words = 1
    while len(b.encode([Text("circle " * (words + 1), target=False)], close=False).ids) + 1 < b.max_len:
        words += 1  # the longest prompt that fits with its [IMG] but leaves no room for the embeddings
    with pytest.raises(SequenceTooLong, match="its image needs"):
        generate_visual(micro_model, b, [[Text("circle " * words, target=False)]])

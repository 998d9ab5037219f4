"""Conversations: Emu-I's turn template, what is learned in them, and their round trip through shards."""

import torch

from nextmm.api import build_model
from nextmm.data.sample import Image, Text, Turn, conversation_sample
from nextmm.data.sequence import SequenceBuilder
from nextmm.data.shards import read_shards, record_to_sample, sample_to_record
from nextmm.models.emu import IGNORE


def chat(scenes):
    return conversation_sample("c", [
        ("user", [Image(scenes[0].image()), Text("describe the picture.")]),
        ("assistant", [Text(scenes[0].caption())]),
        ("user", [Text(f"draw {scenes[1].caption()}.")]),
        ("assistant", [Image(scenes[1].image())]),
    ], system="you are a helpful assistant")


def test_only_the_assistants_turns_are_learned_each_closed_by_eos(micro_model, tokenizer, scenes):
    sample = chat(scenes)
    builder = SequenceBuilder(tokenizer, micro_model.num_queries, 64, 512)
    e = builder.encode(sample.segments)
    ids, labels = e.ids, e.labels
    learned = [ids[t + 1] for t in range(len(ids) - 1) if labels[t] != IGNORE]
    n = micro_model.num_queries
    caption = tokenizer.encode(scenes[0].caption())
    # the first answer's words and its [EOS]; then the second answer's [IMG] and the [EOS] after its picture
    assert learned == caption + [tokenizer.eos_id, tokenizer.img_id, tokenizer.eos_id]
    assert ids.count(tokenizer.user_id) == 2 and ids.count(tokenizer.assistant_id) == 2
    assert ids[:1] == tokenizer.start_ids and ids[1:1 + len(tokenizer.encode("you are a helpful assistant"))] == tokenizer.encode("you are a helpful assistant")
    assert e.drawn == [False, True]  # the user's picture is read, the assistant's regressed
    # an assistant turn opens with [ASSISTANT] ':' and the answer follows
    first = ids.index(tokenizer.assistant_id)
    colon = tokenizer.encode(":")
    assert ids[first + 1:first + 1 + len(colon) + len(caption)] == colon + caption
    assert ids.count(tokenizer.image_id) == 2 * n


def test_an_open_prompt_ends_after_the_assistants_marker(micro_model, tokenizer, scenes):
    builder = SequenceBuilder(tokenizer, micro_model.num_queries, 64, 512)
    segments = [Turn("user"), Image(scenes[0].image()), Text("describe the picture.", target=False), Turn("assistant")]
    e = builder.encode(segments, close=False)
    assert e.ids[-1 - len(tokenizer.encode(":")):] == [tokenizer.assistant_id] + tokenizer.encode(":")
    assert tokenizer.eos_id not in e.ids


def test_regression_covers_the_drawn_pictures_alone(micro_config, tokenizer, scenes):
    micro_config.llm.max_seq_len = 256
    torch.manual_seed(0)
    micro_model = build_model(micro_config, tokenizer)
    builder = SequenceBuilder(tokenizer, micro_model.num_queries, 64, 512)
    batch = builder.collate([builder.encode(chat(scenes).segments)])
    assert batch["drawn"].tolist() == [False, True]
    at, _ = micro_model.regression_rows(batch["input_ids"], batch["drawn"])
    every, _ = micro_model.regression_rows(batch["input_ids"])
    assert len(at) == micro_model.num_queries and torch.equal(at, every[micro_model.num_queries:])
    torch.manual_seed(0)
    out = micro_model.loss(batch["input_ids"], batch["labels"], batch["pixels"], drawn=batch["drawn"])
    visual = micro_model.encode_images(batch["pixels"])
    hidden = micro_model(batch["input_ids"], visual)
    expected = torch.nn.functional.mse_loss(micro_model.regress(hidden[tuple(at.T)]), visual[1].reshape(len(at), -1).float())
    assert torch.allclose(out["l2"], expected, atol=1e-6)
    # with no drawn picture there is nothing to regress
    user_only = builder.collate([builder.encode(chat(scenes).segments[:5])])
    assert user_only["drawn"].tolist() == [False]
    assert "l2" not in micro_model.loss(user_only["input_ids"], user_only["labels"], user_only["pixels"], drawn=user_only["drawn"])


def test_turns_round_trip_through_records_and_shards(tmp_path, scenes):
    from nextmm.data.shards import ShardWriter

    sample = chat(scenes)
    back = record_to_sample(sample_to_record(sample))
    assert [type(s).__name__ for s in back.segments] == [type(s).__name__ for s in sample.segments]
    assert [s.role for s in back.segments if isinstance(s, Turn)] == ["user", "assistant", "user", "assistant"]
    with ShardWriter(tmp_path, prefix="conversation") as writer:
        writer.write(sample)
    read = list(read_shards(tmp_path))
    assert len(read) == 1 and read[0].kind == "conversation"
    assert [(type(s).__name__, getattr(s, "role", getattr(s, "target", None))) for s in read[0].segments] == \
           [(type(s).__name__, getattr(s, "role", getattr(s, "target", None))) for s in sample.segments]

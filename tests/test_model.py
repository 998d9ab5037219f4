from functools import partial

import pytest
import torch
import torch.nn.functional as F

from nextmm.config import ConfigError, make_config
from nextmm.data.sample import Image, Text, Video, caption_sample, vqa_sample
from nextmm.data.sequence import SequenceBuilder, SequenceTooLong
from nextmm.generate import generate_ids
from nextmm.heads.location import box_roles, location_token_loss
from nextmm.models.emu import IGNORE
from nextmm.models.llm import KVCache
from nextmm.models.resampler import CausalResampler


def builder_for(model, tokenizer):
    return SequenceBuilder.for_config(tokenizer, model.cfg)


def test_image_block_layout_and_labels(micro_model, tokenizer, scenes):
    b = builder_for(micro_model, tokenizer)
    enc = b.encode(vqa_sample("k", scenes[0].image(), "what shape is the red object?", "circle").segments)
    n = micro_model.num_queries
    assert enc.ids[:3 + n] == [tokenizer.bos_id, tokenizer.img_id] + [tokenizer.image_id] * n + [tokenizer.img_end_id]
    labelled = [label for label in enc.labels if label != IGNORE]
    # Only the answer and [EOS] are learned: not the question, never an image token.
    assert labelled == tokenizer.encode("circle") + [tokenizer.eos_id]
    assert len(enc.images) == 1


def test_img_is_learned_only_where_an_image_follows_target_text(micro_model, tokenizer, scenes):
    b = builder_for(micro_model, tokenizer)
    edit = b.encode([Image(scenes[0].image()), Text("make the red circle blue"), Image(scenes[1].image())])
    prompt_then_image = b.encode([Text("a large red circle", target=False), Image(scenes[1].image())])
    img_labels = lambda enc: [label for label in enc.labels if label == tokenizer.img_id]  # noqa: E731
    assert img_labels(edit) == [tokenizer.img_id]  # the second image only: the first follows nothing the model wrote
    assert img_labels(prompt_then_image) == []
    assert all(label not in (tokenizer.image_id, tokenizer.img_end_id) for label in edit.labels)


def test_video_is_one_block_per_frame(micro_model, tokenizer, scenes):
    b = builder_for(micro_model, tokenizer)
    frames = [s.image() for s in scenes[:3]]
    enc = b.encode([Video(frames), Text("moves left")])
    assert enc.ids.count(tokenizer.img_id) == 3 and enc.ids.count(tokenizer.image_id) == 3 * micro_model.num_queries


def test_video_frames_setting_keeps_evenly_spaced_frames_first_and_last_included(tokenizer, scenes):
    frames = [s.image() for s in scenes[:8]]
    picked = {}
    for k in (0, 1, 2, 4, 8, 12):
        b = SequenceBuilder(tokenizer, 4, 64, 256, video_frames=k)
        enc = b.encode([Video(frames), Text("moves left")])
        picked[k] = [frames.index(f) for f in enc.images]
        assert enc.ids.count(tokenizer.img_id) == len(picked[k])
    assert picked == {0: list(range(8)), 1: [4], 2: [0, 7], 4: [0, 2, 5, 7], 8: list(range(8)), 12: list(range(8))}
    with pytest.raises(ConfigError, match="vision.video_frames"):
        make_config("micro", overrides=["vision.video_frames=-1"])


def test_too_long_sequence_is_refused_clearly(micro_model, tokenizer, scenes):
    b = builder_for(micro_model, tokenizer)
    with pytest.raises(SequenceTooLong, match="context is 128"):
        b.encode([Video([scenes[0].image()] * 40)])


def test_loss_has_ce_and_regression_of_every_visual_embedding(micro_model, tokenizer, scenes):
    b = builder_for(micro_model, tokenizer)
    batch = b.collate([b.encode(caption_sample("k", s.image(), s.caption()).segments) for s in scenes[:4]])
    seen = {}
    handle = micro_model.regression_head.register_forward_hook(lambda m, i, o: seen.update(rows=o.shape[0]))
    out = micro_model.loss(batch["input_ids"], batch["labels"], batch["pixels"])
    handle.remove()
    assert seen["rows"] == 4 * micro_model.num_queries
    assert out["loss"].item() == pytest.approx(out["ce"].item() + out["l2"].item(), rel=1e-5)


def test_soft_location_targets_reward_near_misses_and_leave_words_alone(micro_model, tokenizer):
    bins, vocab = tokenizer.bin_ids, tokenizer.vocab_size
    assert micro_model.heads.location_ids.tolist() == bins
    word = tokenizer.encode("red")[0]
    labels = torch.tensor([word, bins[20]])
    torch.manual_seed(0)
    logits = torch.randn(2, vocab)
    one_hot = torch.nn.functional.cross_entropy(logits, labels)
    text_loss = partial(location_token_loss, micro_model.heads.location_ids)
    assert text_loss(0.0)(logits, labels) == pytest.approx(one_hot.item())
    assert text_loss(2.0)(logits[:1], labels[:1]) == pytest.approx(one_hot_row(logits[0], word))

    def sure_of(bin_index: int) -> torch.Tensor:  # a row that puts (nearly) all its mass on one bin
        row = torch.full((1, vocab), -30.0)
        row[0, bins[bin_index]] = 30.0
        return row

    near, far, exact = (text_loss(1.5)(sure_of(k), labels[1:]).item() for k in (21, 45, 20))
    assert 0 < exact < near < far  # one-hot CE gives the near and the far miss the same loss
    target = torch.exp(-((torch.arange(len(bins)) - 20.0) ** 2) / (2 * 1.5**2))
    matched = torch.full((1, vocab), -1e4)
    matched[0, bins] = (target / target.sum()).log()
    assert text_loss(1.5)(matched, labels[1:]).item() == pytest.approx(0.0, abs=1e-5)  # a KL: 0 at the target


def test_location_head_reads_a_place_off_one_direction_of_the_hidden_state(micro_model, tokenizer):
    from nextmm.heads.location import LocationHead

    torch.manual_seed(0)
    direction = torch.randn(32)

    def batch(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        place = torch.randint(0, 64, (n,))
        return torch.randn(n, 32) * 0.1 + (place[:, None] / 63 - 0.5) * direction, place

    def miss_after_training(head: torch.nn.Module) -> float:
        optimizer = torch.optim.Adam(head.parameters(), lr=0.01)
        for _ in range(150):
            hidden, place = batch()
            loss = torch.nn.functional.cross_entropy(head(hidden), place)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        hidden, place = batch(2000)
        return (head(hidden).argmax(-1) - place).abs().float().mean().item()

    head_miss, rows_miss = miss_after_training(LocationHead(32, 64)), miss_after_training(torch.nn.Linear(32, 64))
    assert head_miss < 2.0 and head_miss < rows_miss / 2  # a row per bin must first learn how the bins are ordered
    # in the model, the bins' logits are the head's and every other token's the LM head's
    hidden, words = torch.randn(1, 3, micro_model.cfg.llm.width), torch.tensor([tokenizer.encode("a red circle")[:1] * 3])
    plain = micro_model.llm.lm_head(hidden[0])
    logits = micro_model.heads.location.logits(micro_model.read(words, None), hidden, torch.ones(1, 3, dtype=torch.bool), plain)
    hidden = hidden[0]
    bins = tokenizer.bin_ids
    others = [i for i in range(tokenizer.vocab_size) if i not in set(bins)]
    assert torch.equal(logits[:, others], plain[:, others]) and torch.allclose(logits[:, bins], micro_model.heads.location(hidden))


def test_patch_pointer_finds_the_named_object_where_the_hidden_state_does_not_say_where(micro_model, tokenizer):
    from nextmm.heads.location import LocationHead, PatchPointer, Sight

    torch.manual_seed(0)
    grid, width, patch_width = 4, 32, 16
    looks = torch.randn(2, patch_width) * 2  # two kinds of object
    names, axes = torch.randn(2, width), torch.randn(2, width)  # the hidden state names one and an axis, never a place

    def batch(n: int = 128) -> tuple[torch.Tensor, ...]:
        patches = torch.randn(n, grid * grid, patch_width) * 0.3
        spots = torch.stack([torch.randperm(grid * grid)[:2] for _ in range(n)])  # the two objects' patches
        patches[torch.arange(n)[:, None], spots] += looks
        named, axis = torch.randint(0, 2, (n,)), torch.randint(0, 2, (n,))
        spot = spots[torch.arange(n), named]
        cell = torch.where(axis == 0, spot % grid, spot // grid)  # column for x, row for y
        place = (cell * 16 + 8).clamp(max=63)  # the patch centre, in 64 bins
        noise = torch.randn(n, width) * 0.1
        return names[named] + axes[axis] + noise, axes[axis] + noise, names[named], patches, place, spot

    def miss_after_training(head: LocationHead, words_name_it: bool = False) -> float:
        """With words_name_it the hidden state says only the axis, and the word bags name the object. As in
        LocationHead.pointer_loss, the pointer's attention is also told the named object's patch."""

        def logits(n: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            hidden, axis_only, words, patches, place, spot = batch(n)
            asking, sight = (axis_only, Sight(patches, torch.arange(n), words)) if words_name_it else (hidden, Sight(patches, torch.arange(n)))
            told = 0.0
            if head.pointer is not None:
                attention = head.pointer.attention(asking, patches, sight.image_index, sight.words)
                told = -attention[torch.arange(n), spot].clamp_min(1e-9).log().mean()
            return head(asking, sight), place, told

        optimizer = torch.optim.Adam(head.parameters(), lr=0.01)
        for _ in range(600):
            predicted, place, told = logits()
            loss = torch.nn.functional.cross_entropy(predicted, place) + told
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        predicted, place, _ = logits(1000)
        return (predicted.argmax(-1) - place).abs().float().mean().item()

    pointed = miss_after_training(LocationHead(width, 64, pointer=PatchPointer(width, patch_width, grid, words=False, roles=False)))
    alone = miss_after_training(LocationHead(width, 64))
    assert pointed <= 6 and alone >= 12  # a patch is 16 bins wide; without the pointer the head can only guess
    worded = miss_after_training(LocationHead(width, 64, pointer=PatchPointer(width, patch_width, grid, roles=False)), words_name_it=True)
    assert worded <= 6, "the words alone tell the pointer which object"
    # in the model, a row with no image before it gets the plain head's logits
    head = micro_model.heads.location
    # after an image the place is the pointer's own box
    hidden, words = torch.randn(2, micro_model.cfg.llm.width), torch.randn(2, micro_model.cfg.llm.width)
    patches = torch.randn(1, len(head.pointer.where), micro_model.cfg.vision.width)
    logits = head(hidden, Sight(patches, torch.tensor([-1, 0]), words, torch.tensor([0, 2])))
    plain = head(hidden)
    assert torch.equal(logits[0], plain[0]) and not torch.allclose(logits[1], plain[1])
    with pytest.raises(ValueError, match="word"):
        head(hidden, Sight(patches, torch.tensor([-1, 0])))
    with pytest.raises(ValueError, match="role"):
        head(hidden, Sight(patches, torch.tensor([-1, 0]), words))


def test_latest_image_follows_each_rows_pictures_in_reading_order(micro_model, tokenizer):
    slot, word, n = micro_model.image_token_id, tokenizer.encode("red")[0], micro_model.num_queries
    rows = torch.tensor([
        [word] + [slot] * n + [word] + [slot] * n + [word],
        [word] * (2 * n + 2) + [word],
        [slot] * n + [word] * (n + 3),
    ])
    index = micro_model.read(rows, None).latest_image
    assert index[0].tolist() == [-1] + [0] * (n + 1) + [1] * (n + 1)
    assert index[1].tolist() == [-1] * (2 * n + 3)
    assert index[2].tolist() == [2] * (2 * n + 3)


def one_hot_row(row: torch.Tensor, label: int) -> float:
    return torch.nn.functional.cross_entropy(row[None], torch.tensor([label])).item()


def test_training_steps_lower_the_loss(micro_model, tokenizer, scenes):
    b = builder_for(micro_model, tokenizer)
    batch = b.collate([b.encode(caption_sample("k", s.image(), s.caption()).segments) for s in scenes])
    opt = torch.optim.AdamW(micro_model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = micro_model.loss(batch["input_ids"], batch["labels"], batch["pixels"])
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0]


def prompts_for(scenes):
    return [
        [Image(scenes[0].image())],
        [Image(scenes[1].image()), Text("question: what color is the circle? answer:", target=False)],
        [Video([s.image() for s in scenes[2:5]]), Text("a large", target=False)],
        [Text("this is a", target=False)],
    ]


def test_kv_cache_matches_full_forward_hidden_states(micro_model):
    torch.manual_seed(1)
    llm = micro_model.llm
    x = torch.randn(2, 9, llm.cfg.width)
    full = llm(x)
    cache = KVCache(llm.cfg, 2, 16, torch.float32)
    first = llm(x[:, :5], cache=cache)
    rest = [llm(x[:, t : t + 1], positions=torch.full((2, 1), t), mask=torch.ones(2, 1, 1, t + 1, dtype=torch.bool), cache=cache) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=1e-4)


def test_context_overflow_in_llm_is_an_error(micro_model):
    llm = micro_model.llm
    with pytest.raises(ValueError, match="exceeds the model's context"):
        llm(torch.randn(1, llm.cfg.max_seq_len + 1, llm.cfg.width))


def test_each_query_is_seeded_from_its_own_region_of_the_patch_grid():
    from nextmm.models.resampler import region_grid, region_max

    assert [region_grid(n) for n in (4, 8, 32, 5)] == [(2, 2), (2, 4), (4, 8), (1, 5)]
    patches = torch.zeros(1, 64, 3)  # an 8 x 8 grid, CLS left out
    patches[0, 1 * 8 + 6] = torch.tensor([1.0, 2.0, 3.0])  # row 1, column 6: top half, last quarter
    patches[0, 7 * 8 + 0, 0] = 5.0  # row 7, column 0: bottom half, first quarter
    seeds = region_max(patches, 8)
    expected = torch.zeros(1, 8, 3)
    expected[0, 3] = torch.tensor([1.0, 2.0, 3.0])
    expected[0, 4, 0] = 5.0
    torch.testing.assert_close(seeds, expected)


def test_region_coordinates_say_where_in_the_image_each_region_holds_something():
    from nextmm.models.resampler import region_coordinates

    patches = torch.zeros(2, 64, 3)  # an 8 x 8 grid, CLS left out; patch centres from -0.5 to 0.5
    patches[0, 1 * 8 + 6, 0] = 3.0  # row 1, column 6: region 3 (top half, last quarter)
    patches[1, 6 * 8 + 1, 1] = 3.0  # row 6, column 1: region 4 (bottom half, first quarter)
    where = region_coordinates(patches, 8)  # (B, 8 regions, x of 3 channels then y of 3 channels)
    step = 1 / 7
    assert where[0, 3, 0] == pytest.approx(-0.5 + 6 * step, abs=0.01)  # x: column 6
    assert where[0, 3, 3] == pytest.approx(-0.5 + 1 * step, abs=0.01)  # y: row 1
    assert where[1, 4, 1] == pytest.approx(-0.5 + 1 * step, abs=0.01)  # x: column 1
    assert where[1, 4, 4] == pytest.approx(-0.5 + 6 * step, abs=0.01)  # y: row 6
    # A channel with nothing in a region points at the region's centre: region 3 spans columns 6-7, rows 0-3.
    assert where[0, 3, 1] == pytest.approx(-0.5 + 6.5 * step, abs=1e-5)
    assert where[0, 3, 4] == pytest.approx(-0.5 + 1.5 * step, abs=1e-5)
    # Moving the object moves its coordinate and nothing in the other regions.
    moved = patches.clone()
    moved[0, 1 * 8 + 6, 0], moved[0, 1 * 8 + 7, 0] = 0.0, 3.0
    shifted = region_coordinates(moved, 8)
    assert shifted[0, 3, 0] > where[0, 3, 0] + 0.1
    torch.testing.assert_close(shifted[0, :3], where[0, :3])


def test_region_coordinates_start_silent_and_can_be_turned_off():
    cfg = make_config("micro")
    with torch.no_grad():
        resampler = CausalResampler(cfg.resampler, cfg.vision.width)
        features = torch.randn(2, cfg.vision.num_tokens, cfg.vision.width)
        with_coords = resampler(features)
        cfg.resampler.region_coords = False
        plain = CausalResampler(cfg.resampler, cfg.vision.width)
        plain.load_state_dict(resampler.state_dict(), strict=False)
        torch.testing.assert_close(plain(features), with_coords)  # zero-initialised: no change at the start
    assert not hasattr(plain, "coord_proj")


def test_tied_embeddings_share_one_matrix_through_training_and_a_save(tmp_path, micro_config, tokenizer, scenes):
    import nextmm
    from nextmm.api import NextMM, build_model

    micro_config.llm.tie_embeddings = True
    torch.manual_seed(0)
    model = build_model(micro_config, tokenizer)
    assert model.llm.lm_head.weight is model.llm.embed_tokens.weight
    b = builder_for(model, tokenizer)
    batch = b.collate([b.encode(caption_sample("k", s.image(), s.caption()).segments) for s in scenes[:4]])
    model.loss(batch["input_ids"], batch["labels"], batch["pixels"])["loss"].backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert model.llm.lm_head.weight is model.llm.embed_tokens.weight
    loaded = nextmm.load(NextMM(model, tokenizer, micro_config).save(tmp_path / "model")).model
    assert loaded.llm.lm_head.weight is loaded.llm.embed_tokens.weight
    torch.testing.assert_close(loaded.llm.embed_tokens.weight, model.llm.embed_tokens.weight)


def test_pointer_loss_is_its_attentions_cross_entropy_against_each_boxs_patches(micro_model, tokenizer):
    from nextmm.worlds.shapes import generator as shapes

    pointer = micro_model.heads.location.pointer
    grid = pointer.grid
    cell = 1 / grid
    share = pointer.box_share(torch.tensor([[cell, 2 * cell, 2 * cell, 3 * cell], [0.5 * cell, 0.0, 1.5 * cell, cell]]))
    assert share[0, 2 * grid + 1] == pytest.approx(1.0) and share[0].sum() == pytest.approx(1.0)  # one patch: row 2, column 1
    assert share[1, 0] == pytest.approx(0.5) and share[1, 1] == pytest.approx(0.5) and share[1].sum() == pytest.approx(1.0)

    micro_model.eval()
    b = builder_for(micro_model, tokenizer)
    grounding = [s for s in shapes.make_samples("ground", 0, 2)][:3]
    batch = b.collate([b.encode(s.segments) for s in grounding])
    ids, labels, pixels = batch["input_ids"], batch["labels"], batch["pixels"]
    out = micro_model.loss(ids, labels, pixels, head_weight=0.5)
    # by hand: each question's four labelled location tokens make one box, and each of their rows is scored
    visual, patches = micro_model.see(pixels)
    hidden = micro_model(ids, visual)
    rows = torch.isin(labels, micro_model.heads.location_ids).nonzero()
    assert len(rows) == 4 * len(grounding)
    boxes = torch.tensor([tokenizer.box_from_ids(labels[r, t : t + 4].tolist(), 1) for r, t in rows[::4]]).repeat_interleave(4, 0)
    at = rows[:, 0], rows[:, 1]
    image_index, words = micro_model.read(ids, None).latest_image[at], micro_model.read(ids, None).word_bags[at]
    attention = pointer.attention(hidden[at], patches, image_index, words)
    own = pointer.box(pointer.read(patches, image_index, attention), hidden[at], words)  # the pointer's own box, from the centre
    expected = -(pointer.box_share(boxes) * attention.log()).sum(-1).mean() + 10 * (own - (boxes - 0.5)).abs().mean()
    torch.testing.assert_close(out["pointer"], expected)
    torch.testing.assert_close(out["loss"], out["ce"] + 0.5 * out["pointer"] + out["l2_weight"] * out["l2"])
    # a batch that writes no box has no pointer loss, and a weight of 0 asks for none
    captions = b.collate([b.encode(s.segments) for s in shapes.make_samples("caption", 0, 2)])
    assert "pointer" not in micro_model.loss(captions["input_ids"], captions["labels"], captions["pixels"], head_weight=0.5)
    assert "pointer" not in micro_model.loss(ids, labels, pixels)


def test_clip_cell_features_are_the_whole_pictures_then_each_cells_max_pooled(micro_config, tokenizer):
    from nextmm.models.clip import CLIP

    torch.manual_seed(0)
    clip = CLIP(micro_config.vision, micro_config.clip_text, tokenizer.vocab_size).eval()
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    side = micro_config.vision.image_size // micro_config.vision.patch_size
    with torch.no_grad():
        cells = clip.encode_image_cells(pixels, 2)
        patches = clip.visual(pixels)[:, 1:].view(2, side, side, -1)
        by_patch = clip.encode_image_cells(pixels, side)  # a cell per patch
        expected = torch.nn.functional.normalize(clip.image_proj(patches[:, : side // 2, side // 2 :].amax((1, 2))), dim=-1)
        torch.testing.assert_close(cells[:, 0], clip.encode_image(pixels))
        torch.testing.assert_close(clip.encode_image_cells(pixels, 0), cells[:, :1])  # no grid: the whole picture alone
        torch.testing.assert_close(cells[:, 2], expected)  # row 0, column 1: the top-right quarter
        torch.testing.assert_close(by_patch[:, 1:], torch.nn.functional.normalize(clip.image_proj(patches.flatten(1, 2)), dim=-1))
    assert cells.shape == (2, 5, micro_config.clip_text.embed_dim)
    with pytest.raises(ValueError, match="does not split"):
        clip.encode_image_cells(pixels, side + 1)


def bag_test_batch(model, tokenizer, other_kind: str) -> tuple[list, dict]:
    """For the word bags' tests: a detection sample of two or more objects and one `other_kind` sample, and
    their batch; the model in eval mode, its word gates made unequal."""
    from nextmm.worlds.shapes import generator as shapes

    model.eval()
    torch.nn.init.normal_(model.heads.location.pointer.word_gate.weight)
    b = builder_for(model, tokenizer)
    samples = [next(s for s in shapes.make_samples("detect", 0, 50) if len(s.meta["objects"]) >= 2), next(iter(shapes.make_samples(other_kind, 0, 1)))]
    return samples, b.collate([b.encode(s.segments) for s in samples])


def test_word_bags_hold_the_words_since_the_latest_image_or_box_and_generation_keeps_them_step_by_step(micro_model, tokenizer):
    (detection, grounding), batch = bag_test_batch(micro_model, tokenizer, "ground")
    ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        bags = micro_model.read(ids, None).word_bags
        pointer = micro_model.heads.location.pointer
        weighed = pointer.word_weight(micro_model.llm.embed_tokens(ids)) * micro_model.llm.embed_tokens(ids)
    is_location = torch.isin(ids, micro_model.heads.location_ids)
    for row, sample in enumerate((detection, grounding)):
        writes = torch.isin(labels[row], micro_model.heads.location_ids).nonzero().flatten()  # where each box is written
        firsts = writes[::4]
        phrases = [part.split(" <loc>")[0] for part in sample.segments[-1].text.split(", ")] if row == 0 else [sample.meta["phrase"]]
        for n, first in enumerate(firsts.tolist()):
            torch.testing.assert_close(bags[row, first : first + 4], bags[row, first].expand(4, -1))  # a box keeps its words
            begin = max(i for i in range(first + 1) if i == 0 or ids[row, i - 1] == micro_model.image_token_id or bool(is_location[row, i - 1]))
            torch.testing.assert_close(bags[row, first], weighed[row, begin : first + 1].sum(0))
            said = tokenizer.decode(ids[row, begin : first + 1].tolist())
            if row == 0 and n > 0:
                assert said.strip() == f", {phrases[n]}"  # a later box reads its own object's phrase alone
            else:
                assert phrases[0 if row else n] in said and "<bin" not in said
    # one token at a time, as generation appends them, gives the same bags
    with torch.no_grad():
        stepped = bags[:, 0]
        for t in range(1, ids.shape[1]):
            stepped = micro_model.heads.words(micro_model.llm.embed_tokens).next_bags(stepped, ids[:, t - 1], ids[:, t])
            torch.testing.assert_close(stepped, bags[:, t])


def test_a_question_about_one_object_tells_the_pointer_that_objects_patches_at_its_last_token(micro_model, tokenizer):
    from nextmm.worlds.shapes import generator as shapes

    micro_model.eval()
    b = builder_for(micro_model, tokenizer)
    asked = [s for s in shapes.make_samples("vqa", 0, 30) if shapes.named_object(s) is not None][:3]
    encoded = [b.encode(s.segments, named=shapes.named_object(s)) for s in asked]
    for pad in (False, True):
        batch = b.collate(encoded, left_pad=pad)
        told = batch["named_boxes"][..., 0].isfinite().nonzero()
        assert len(told) == len(asked)
        for (row, position), sample in zip(told.tolist(), asked):
            assert tokenizer.decode(batch["input_ids"][row, : position + 1].tolist()).endswith("answer:")  # the question's last token
            assert batch["labels"][row, position] == tokenizer.encode(sample.segments[2].text)[0]  # where the answer is written
            torch.testing.assert_close(batch["named_boxes"][row, position], torch.tensor(shapes.named_object(sample)[1]))
    ids, labels, pixels, named = batch["input_ids"], batch["labels"], batch["pixels"], batch["named_boxes"]
    assert "pointer" not in micro_model.loss(ids, labels, pixels, head_weight=1.0)  # VQA writes no box
    out = micro_model.loss(ids, labels, pixels, head_weight=1.0, extras={"named_boxes": named})
    visual, patches = micro_model.see(pixels)
    hidden = micro_model(ids, visual)
    at = tuple(told.T)
    pointer = micro_model.heads.location.pointer
    image_index, words = micro_model.read(ids, None).latest_image[at], micro_model.read(ids, None).word_bags[at]
    attention = pointer.attention(hidden[at], patches, image_index, words)
    own = pointer.box(pointer.read(patches, image_index, attention), hidden[at], words)
    expected = -(pointer.box_share(named[at]) * attention.log()).sum(-1).mean() + 10 * (own - (named[at] - 0.5)).abs().mean()
    torch.testing.assert_close(out["pointer"], expected)


def test_a_named_object_trains_the_pointer_alone_where_a_written_box_trains_the_llm_too(micro_model, tokenizer):
    """A question's named object teaches the pointer only: its hidden state, word bag and patches are detached,
    so the reading batches' named boxes do not hold off the LLM's learning to read (BENCHMARKS.md, session 22)."""
    from nextmm.worlds.shapes import generator as shapes

    b = builder_for(micro_model, tokenizer)
    asked = [s for s in shapes.make_samples("vqa", 0, 30) if shapes.named_object(s) is not None][:2]
    grounded = list(shapes.make_samples("ground", 0, 2))
    pointer = micro_model.heads.location.pointer

    def gradients(samples, named: bool) -> tuple[float, float, float]:
        """The pointer loss's gradient norms on the pointer, the LLM (and its embeddings) and the vision tower."""
        batch = b.collate([b.encode(s.segments, named=shapes.named_object(s) if named else None) for s in samples])
        micro_model.zero_grad()
        out = micro_model.loss(batch["input_ids"], batch["labels"], batch["pixels"], head_weight=1.0,
                               extras={"named_boxes": batch["named_boxes"] if named else None})
        out["pointer"].backward()
        norm = lambda module: sum(float(p.grad.norm()) for p in module.parameters() if p.grad is not None)
        return norm(pointer), norm(micro_model.llm), norm(micro_model.vision)

    on_pointer, on_llm, on_vision = gradients(asked, named=True)
    assert on_pointer > 0 and on_llm == 0 and on_vision == 0
    on_pointer, on_llm, on_vision = gradients(grounded, named=False)
    assert on_pointer > 0 and on_llm > 0 and on_vision > 0


def test_every_object_of_a_picture_tells_the_pointer_its_patches_asked_by_its_phrase_alone(micro_model, tokenizer):
    from nextmm.worlds.shapes import generator as shapes

    micro_model.eval()
    b = builder_for(micro_model, tokenizer)
    # a story (several pictures, no regions) between one-picture samples: region_image counts every picture before
    samples = [next(iter(shapes.make_samples(kind, 0, 1))) for kind in ("ground", "story", "detect")]
    encoded = [b.encode(s.segments, regions=shapes.object_regions(s)) for s in samples]
    batch = b.collate(encoded)
    pictures = [len(e.images) for e in encoded]
    expected_images = [0] * len(shapes.object_regions(samples[0])) + [pictures[0] + pictures[1]] * len(shapes.object_regions(samples[2]))
    assert batch["region_image"].tolist() == expected_images and pictures[1] > 1
    phrases = [p for s in (samples[0], samples[2]) for _, p, _ in shapes.object_regions(s)]
    for ids, phrase in zip(batch["region_ids"].tolist(), phrases):
        assert tokenizer.decode([i for i in ids if i >= 0]) == phrase
    regions = (batch["region_ids"], batch["region_image"], batch["region_boxes"])
    out = micro_model.loss(batch["input_ids"], batch["labels"], batch["pixels"], head_weight=1.0, extras={"regions": regions})
    # by hand: the phrase's gated word embeddings ask, with no hidden state
    _, patches = micro_model.see(batch["pixels"])
    pointer = micro_model.heads.location.pointer
    embeds = micro_model.llm.embed_tokens(batch["region_ids"].clamp_min(0)).float()
    bags = (pointer.word_weight(embeds) * embeds * (batch["region_ids"] >= 0)[..., None]).sum(1)
    boxes = batch["region_boxes"]
    attention = pointer.attention(None, patches, batch["region_image"], bags)
    own = pointer.box(pointer.read(patches, batch["region_image"], attention), None, bags)
    expected = -(pointer.box_share(boxes) * attention.log()).sum(-1).mean() + 10 * (own - (boxes - 0.5)).abs().mean()
    torch.testing.assert_close(out["regions"], expected)
    plain = micro_model.loss(batch["input_ids"], batch["labels"], batch["pixels"], head_weight=1.0)
    reading = micro_model.read(batch["input_ids"], micro_model.see(batch["pixels"])[0])
    presence = micro_model.heads.presence.presence_loss(reading, batch["region_ids"], batch["region_image"])  # its own test: test_presence.py
    torch.testing.assert_close(out["presence"], presence)
    torch.testing.assert_close(out["text"], plain["text"] + expected + presence)
    assert "regions" not in plain and "presence" not in plain


def test_region_phrases_alone_teach_the_pointer_which_of_several_objects_a_phrase_names(micro_model, tokenizer):
    torch.manual_seed(0)
    grid = micro_model.heads.location.pointer.grid
    patch_width, kinds = micro_model.cfg.vision.width, 6
    looks = torch.randn(kinds, patch_width) * 2
    words = torch.tensor(tokenizer.encode("red green blue circle square triangle"))  # a word per kind of object

    def scenes(n: int) -> tuple[torch.Tensor, ...]:
        """n pictures of three different objects, each on one patch, and a region per picture naming one of them"""
        patches = torch.randn(n, grid * grid, patch_width) * 0.3
        spots = torch.stack([torch.randperm(grid * grid)[:3] for _ in range(n)])
        kind = torch.stack([torch.randperm(kinds)[:3] for _ in range(n)])
        patches[torch.arange(n)[:, None], spots] += looks[kind]
        named = torch.randint(0, 3, (n,))
        spot = spots[torch.arange(n), named]
        cells = torch.stack([spot % grid, spot // grid], -1).float()
        return patches, words[kind[torch.arange(n), named]][:, None], torch.cat([cells, cells + 1], -1) / grid, spot

    def share_on_named(n: int = 500) -> float:
        patches, ids, _, spot = scenes(n)
        with torch.no_grad():
            bags = words_of.weighed(micro_model.llm.embed_tokens(ids), ids >= 0).sum(1)
            attention = micro_model.heads.location.pointer.attention(None, patches, torch.arange(n), bags)
        return attention[torch.arange(n), spot].mean().item()

    words_of = micro_model.heads.words(micro_model.llm.embed_tokens)
    before = share_on_named()
    optimizer = torch.optim.Adam(micro_model.parameters(), lr=0.01)
    for _ in range(300):
        patches, ids, boxes, _ = scenes(64)
        reading = micro_model.read(ids, None, patches)
        loss = micro_model.heads.location.region_loss(reading, ids, torch.arange(64), boxes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert share_on_named() > 0.8 and before < 0.2  # three objects on 16 patches: a blind look gives ~1/16


def test_the_pointer_reads_the_place_around_its_attentions_peak_not_between_objects():
    from nextmm.heads.location import PatchPointer

    pointer = PatchPointer(8, 8, grid=8, key_width=8, words=False)
    attention = torch.zeros(2, 8, 8)
    attention[0, 1:3, 1:3] = 0.7 / 4  # most of it on an object over four patches, rows and columns 1-2
    attention[0, 7, 7] = 0.3  # the rest on another object, far away
    attention[1] = 1 / 64  # and a row that looks everywhere alike
    read = pointer.read(torch.zeros(1, 64, 8), torch.zeros(2, dtype=torch.long), attention.flatten(1))
    object_centre = 2 / 8 - 0.5  # the patches' shared corner, from the image's centre
    assert (read[0, :2] - object_centre).abs().max() < 0.1 / 8  # within a tenth of a patch; the whole grid's mean is 1.7 off
    assert torch.isfinite(read).all() and (read[1, :2].abs() < 0.5).all()
    local = pointer.around_peak(attention.flatten(1))
    torch.testing.assert_close(local.sum(-1), torch.ones(2))
    assert local[0, 63] < 1e-6


def test_a_boxs_sides_start_at_the_pointed_place_by_their_order_in_the_box(micro_model, tokenizer):
    from nextmm.heads.location import PatchPointer
    from nextmm.worlds.shapes import generator as shapes

    pointer = PatchPointer(8, 8, grid=4, key_width=8, words=False)
    with torch.no_grad():
        pointer.query.weight.copy_(torch.eye(8) * 10)
        pointer.key.weight.copy_(torch.eye(8) * 10)
    patches = torch.zeros(1, 16, 8)
    patches[0, 6, 0] = 1  # the object: row 1, column 2
    hidden = torch.eye(8)[:1].expand(4, -1)
    moves = pointer(hidden, patches, torch.zeros(4, dtype=torch.long), roles=torch.arange(4))
    centre_x, centre_y = (2 + 0.5) / 4 - 0.5, (1 + 0.5) / 4 - 0.5  # from the image's centre, as the head counts
    torch.testing.assert_close(moves, torch.tensor([centre_x - 0.15, centre_y - 0.15, centre_x + 0.15, centre_y + 0.15]), atol=1e-4, rtol=0)
    # the roles come from how many location tokens end at each position, during generation too
    b = builder_for(micro_model, tokenizer)
    detection = next(s for s in shapes.make_samples("detect", 0, 50) if len(s.meta["objects"]) >= 2)
    batch = b.collate([b.encode(detection.segments)])
    ids, labels = batch["input_ids"], batch["labels"]
    roles = box_roles(ids, micro_model.heads.location_ids)
    writes = torch.isin(labels[0], micro_model.heads.location_ids).nonzero().flatten()
    assert roles[0, writes].tolist() == [0, 1, 2, 3] * (len(writes) // 4)
    assert (roles[0, ~torch.isin(ids[0], micro_model.heads.location_ids)] == 0).all()  # after a word comes x0, if a box
    pointing = micro_model.heads.location.decoding(micro_model.read(ids[:, :1], *micro_model.see(batch["pixels"])))
    for t in range(1, ids.shape[1]):
        pointing.token(ids[:, t - 1], ids[:, t])
        assert torch.equal(pointing.sight.roles, roles[:, t])


def test_the_copy_head_mixes_a_distribution_that_copies_the_token_after_the_position_it_looks_at(micro_model, tokenizer):
    from nextmm.heads.copy import Copying, copy_sources
    from nextmm.worlds.shapes import generator as shapes

    head = micro_model.heads.copy
    torch.manual_seed(0)
    hidden, logits = torch.randn(4, micro_model.cfg.llm.width), torch.randn(4, tokenizer.vocab_size)
    sources = torch.tensor([[7, 9, -1], [7, 9, -1], [-1, -1, -1], [7, 9, -1]])
    weights = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.25, 0.75]])
    with torch.no_grad():
        head.gate.bias.fill_(20.0)  # copy all but surely
        mixed = head.mix(logits, hidden, Copying(weights, sources), micro_model.llm.embed_tokens.weight)
    torch.testing.assert_close(mixed.logsumexp(-1), torch.zeros(4), atol=1e-5, rtol=0)  # a distribution
    assert mixed[0].argmax() == 9 and mixed[1, 7].exp().item() == pytest.approx(0.5, abs=1e-3)
    torch.testing.assert_close(mixed[2], torch.log_softmax(logits[2], -1))  # nothing to copy: the LM's own
    # a look at a position with nothing to copy after it (a word's end) hands that share to the LM
    expected = 0.75 * torch.softmax(logits[3], -1) + 0.25 * F.one_hot(torch.tensor(9), tokenizer.vocab_size)
    torch.testing.assert_close(mixed[3].exp(), expected, atol=1e-5, rtol=0)
    # what may be copied: the token after each position, never a marker, an image slot or a box
    b = builder_for(micro_model, tokenizer)
    ground = next(iter(shapes.make_samples("ground", 0, 1)))
    ids = torch.tensor([b.encode(ground.segments).ids])
    sources = copy_sources(ids, micro_model.heads.uncopyable)[0]
    copyable = sources >= 0
    assert torch.equal(sources[copyable], ids[0, 1:][copyable[:-1]])
    assert not torch.isin(sources[copyable], micro_model.heads.uncopyable).any() and copyable.sum() == len(tokenizer.encode(ground.segments[1].text))
    # each position also asks with the latest picture before it: its patches' maximum less the mean
    # picture (which training keeps), at unit length
    story = next(iter(shapes.make_samples("story", 0, 1)))
    encoded = b.encode(story.segments)
    ids = torch.tensor([encoded.ids])
    with torch.no_grad():
        _, patches = micro_model.see(b.collate([encoded])["pixels"])
        micro_model.train()
        micro_model.heads.copy.picture_mean.fill_(1.0)
        reading = micro_model.read(ids, None, patches)
        head.pictures_at(reading, patches)
        torch.testing.assert_close(micro_model.heads.copy.picture_mean, 0.99 + 0.01 * patches.amax(1).mean(0))
        micro_model.eval()
        pictures = head.pictures_at(reading, patches)[0]
    latest = reading.latest_image[0]
    assert latest.min() == -1 and latest.max() == len(patches) - 1 > 0
    for t in (0, int((latest == 0).nonzero()[0]), len(latest) - 1):
        picture = patches[latest[t]].amax(0) - micro_model.heads.copy.picture_mean
        expected = F.normalize(picture, dim=0) if latest[t] >= 0 else torch.zeros(patches.shape[-1])
        torch.testing.assert_close(pictures[t], expected)


def test_cached_decoding_with_a_copying_head_gives_the_same_tokens_as_full_recompute_and_copies(micro_model, tokenizer, scenes):
    with torch.no_grad():
        micro_model.heads.copy.gate.bias.fill_(8.0)
    b = builder_for(micro_model, tokenizer)
    prompts = prompts_for(scenes)[1:]
    cached = generate_ids(micro_model, b, prompts, max_new_tokens=8, use_cache=True)
    assert cached == generate_ids(micro_model, b, prompts, max_new_tokens=8, use_cache=False)
    for prompt, written in zip(prompts, cached):
        shown = set(b.encode(prompt, close=False).ids)
        assert written and set(written) <= shown  # copying all but surely, it writes only what it was shown


def test_the_stepper_copies_as_training_does_and_looks_where_the_same_token_was_read(micro_model, tokenizer, scenes):
    from nextmm.generate import Stepper
    from nextmm.heads.copy import Recall, copy_sources

    def copying(stepper: Stepper):
        """Where the copy head looks from the prompt's last position, its state and that position's hidden state."""
        recall, hidden = next(state for state in stepper.states if isinstance(state, Recall)), stepper.prefill()
        return recall.copying(hidden), recall, hidden

    b = builder_for(micro_model, tokenizer)
    shots = [Image(scenes[0].image()), Text("this is a dabota", target=False), Image(scenes[1].image()), Text("this is a rozu", target=False)]
    prompts = [[*shots, Image(scenes[0].image()), Text("this is a", target=False)], [Image(scenes[2].image()), Text("this is a", target=False)]]
    batch = b.collate([b.encode(p, close=False) for p in prompts], left_pad=True)
    micro_model.eval()  # in training, each pass moves the mean picture
    with torch.no_grad():
        stepper = Stepper(micro_model, batch, 1, True, "fp32")
        copied, _, hidden = copying(stepper)
        looked, scores = copied.weights, stepper.logits(hidden)
        alone = b.collate([b.encode(prompts[0], close=False)])
        visual, patches = micro_model.see(alone["pixels"])
        ids = alone["input_ids"]
        last = torch.zeros_like(ids, dtype=torch.bool)
        last[0, -1] = True
        hidden, reading = micro_model(ids, visual), micro_model.read(ids, visual, patches)
        trained = micro_model.logits(hidden, reading, last)  # with what it copies, as training reads it
        torch.testing.assert_close(micro_model.heads.copy.copying(reading, hidden, last).weights[0], looked[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(scores[0], trained[0], atol=1e-5, rtol=0)  # the longer prompt has no padding
        assert looked[1][~batch["valid"][1]].sum() == 0 and looked[1].sum() == pytest.approx(1.0)
        # with the cue alone, it looks at the positions that read the same token ("a", followed by the words)
        head = micro_model.heads.copy
        head.query.weight.zero_()
        head.like_pictures.zero_()
        head.same_token.fill_(30.0)
        stepper = Stepper(micro_model, batch, 1, True, "fp32")
        copied, recall, _ = copying(stepper)
        looked = copied.weights[0]
        # with the pictures' cue alone, it looks after the same picture (shown first and last), not the other
        head.same_token.zero_()
        head.like_pictures.fill_(100.0)
        stepper = Stepper(micro_model, batch, 1, True, "fp32")
        by_picture = copying(stepper)[0].weights[0]
    shown = [tokenizer.encode(w)[0] for w in ("dabota", "rozu")]
    assert sorted(copy_sources(recall.read_ids, micro_model.heads.uncopyable)[0][looked > 0.01].tolist()) == sorted(shown) and looked.sum() == pytest.approx(1.0)
    latest = micro_model.read(batch["input_ids"], None).latest_image[0]
    assert by_picture[latest == 1].sum() < 0.01 and by_picture[latest == 0].sum() > 0.1


def test_the_copy_head_learns_to_say_the_word_that_followed_the_same_cue_earlier(micro_config, tokenizer):
    """Fresh pairs in every sequence (cue, word) x 3, then one cue again: only the context says the word."""
    from nextmm.api import build_model

    words = [i for i in range(tokenizer.vocab_size) if i not in set(tokenizer.special_ids) | set(tokenizer.bin_ids)][:60]

    def episodes(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = torch.stack([torch.tensor(words)[torch.randperm(len(words), generator=generator)[:6]] for _ in range(n)])
        asked = torch.randint(0, 3, (n,), generator=generator)
        rows = torch.arange(n)
        ids = torch.cat([torch.full((n, 1), tokenizer.bos_id), pairs, pairs[rows, asked * 2][:, None]], 1)
        labels = torch.full_like(ids, IGNORE)
        labels[:, -1] = pairs[rows, asked * 2 + 1]  # what follows the cue at the last position
        return ids, labels

    def accuracy_after_training(copy_head: bool) -> float:
        micro_config.heads.copy = copy_head
        torch.manual_seed(0)
        model = build_model(micro_config, tokenizer)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(0)
        for _ in range(600):
            ids, labels = episodes(32, generator)
            loss = model.loss(ids, labels, torch.zeros(0, 3, 32, 32))["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        ids, labels = episodes(300, generator)
        with torch.no_grad():
            hidden = model(ids)
            asking = labels != IGNORE
            logits = model.logits(hidden, model.read(ids, None), asking)
        return (logits.argmax(-1) == labels[asking]).float().mean().item()

    # without it the LLM learns to say one of the three words shown (~1/3), not which (0.26 here); with it,
    # the cue of the same token read earlier makes this an induction head's task (1.0 here)
    assert accuracy_after_training(True) > 0.95 and accuracy_after_training(False) < 0.4

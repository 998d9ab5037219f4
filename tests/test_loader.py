import pytest

from nextmm.data.loader import LeftOut, MixedStream
from nextmm.data.make import write_shapes
from nextmm.data.shards import DataError


def keys_stream(root, **kwargs):
    sources = {kind: root / kind for kind in ("caption", "video_qa")}
    return MixedStream(sources, {"caption": 1.0, "video_qa": 3.0}, lambda s: s.key, lambda keys: keys, 4, seed=3, **kwargs)


def test_a_held_back_source_joins_the_mix_after_its_batch_count_and_resumes_in_place(tmp_path):
    write_shapes(tmp_path, {"caption": 40, "video_qa": 40}, seed=0, shard_size=20)
    stream = keys_stream(tmp_path, join_at={"video_qa": 6})
    kinds = [stream.next_batch()[0].split("-")[0] for _ in range(20)]
    assert kinds[:6] == ["caption"] * 6
    assert kinds[6:].count("video_qa") >= 8  # weight 3 of 4 once it has joined

    state = stream.state_dict()
    expected = [stream.next_batch() for _ in range(5)]
    resumed = keys_stream(tmp_path, join_at={"video_qa": 6})
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(5)] == expected


def test_without_join_at_every_source_is_drawn_from_the_start(tmp_path):
    write_shapes(tmp_path, {"caption": 40, "video_qa": 40}, seed=0, shard_size=20)
    stream = keys_stream(tmp_path)
    kinds = [stream.next_batch()[0].split("-")[0] for _ in range(6)]
    assert "video_qa" in kinds


def test_left_out_samples_are_counted_apart_from_bad_ones(tmp_path):
    write_shapes(tmp_path, {"caption": 40}, seed=0, shard_size=20)

    def odd_keys_only(sample):
        if int(sample.key.split("-")[-1]) % 2 == 0:
            raise LeftOut("even key")
        return sample.key

    stream = MixedStream({"caption": tmp_path / "caption"}, {}, odd_keys_only, lambda keys: keys, 4)
    keys = [key for _ in range(8) for key in stream.next_batch()]
    assert all(int(key.split("-")[-1]) % 2 == 1 for key in keys)
    report = stream.report()
    assert report["skipped"] == 0 and report["left_out"] >= 32


def test_a_source_with_nothing_usable_stops_with_the_reason_instead_of_looping(tmp_path):
    write_shapes(tmp_path, {"caption": 10}, seed=0, shard_size=20)

    def nothing(sample):
        raise LeftOut("its caption is longer than clip.max_caption_words=1 words")

    # Stage 0 also counts DataError from its item function as an unusable sample; the stop must still stop.
    for unusable in ((), (DataError,)):
        stream = MixedStream({"caption": tmp_path / "caption"}, {}, nothing, lambda keys: keys, 4, unusable=unusable)
        with pytest.raises(DataError, match="no sample this stage can use .*clip.max_caption_words=1"):
            stream.next_batch()


def test_the_text_to_image_view_reads_caption_pairs_caption_first(tmp_path):
    from nextmm.data.sample import Image, Text
    from nextmm.train.stages import text_to_image_view

    write_shapes(tmp_path, {"caption": 20, "vqa": 20}, seed=0, shard_size=20)
    sources = {kind: tmp_path / kind for kind in ("caption", "vqa")}
    stream = MixedStream(sources, {"caption": 0, "vqa": 0, "text_to_image": 1}, lambda s: s, lambda b: b, 4,
                         views=text_to_image_view(sources))
    for sample in stream.next_batch():
        text, image = sample.segments
        assert isinstance(text, Text) and not text.target and isinstance(image, Image)
        assert sample.key.startswith("caption")
    assert text_to_image_view({"coco": tmp_path / "caption"})["text_to_image"][0] == "coco"
    assert text_to_image_view({"vqa": tmp_path / "vqa", "story": tmp_path}) == {}

    only_vqa = MixedStream({"vqa": tmp_path / "vqa"}, {"vqa": 0, "text_to_image": 1}, lambda s: s, lambda b: b, 4,
                           views={"text_to_image": ("vqa", text_to_image_view(sources)["text_to_image"][1])})
    with pytest.raises(DataError, match="only image-caption pairs are read text-first"):
        only_vqa.next_batch()


def test_the_prefetcher_pins_batches_for_a_gpu_in_its_own_thread(tmp_path, monkeypatch):
    import threading

    import torch

    from nextmm.data.loader import Prefetcher

    write_shapes(tmp_path, {"caption": 8}, seed=0, shard_size=8)
    pinned = []  # (tensor, thread) of every tensor pinned; CPU-only torch cannot pin, so pinning is recorded instead
    collate = lambda items: {"ids": torch.tensor([len(s.key) for s in items]), "keys": [s.key for s in items]}  # noqa: E731
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append((t, threading.current_thread())) or t)
    for pin in (False, True):
        batch = Prefetcher(MixedStream({"caption": tmp_path / "caption"}, {}, lambda s: s, collate, 4), pin=pin).next_batch()
        assert len(batch["keys"]) == 4 and batch["ids"].shape == (4,)
        assert any(t is batch["ids"] for t, _ in pinned) == pin  # the prefetch thread may have pinned the next one too
    assert all(thread is not threading.current_thread() for _, thread in pinned)

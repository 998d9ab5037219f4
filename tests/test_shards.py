import io
import json
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image as PILImage

from nextmm.data.sample import Image, Sample, Text, Video, caption_sample, video_qa_sample, vqa_sample
from nextmm.data import loader
from nextmm.data.loader import MixedStream
from nextmm.data.shards import (
    DataError,
    ReadStats,
    ShardWriter,
    load_pictures,
    read_shards,
    record_to_sample,
    sample_to_record,
)


def picture(seed: int, size=(12, 9)) -> PILImage.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return PILImage.fromarray(pixels, "RGB")


def pixels(image: PILImage.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def captions(n: int, start: int = 0) -> list[Sample]:
    return [caption_sample(f"s{i}", picture(i), f"caption {i}", index=i) for i in range(start, start + n)]


def write(out_dir, samples, **kw):
    with ShardWriter(out_dir, **kw) as writer:
        for s in samples:
            writer.write(s)
    return writer.paths


def keys(samples) -> list[str]:
    return [s.key for s in samples]


def test_round_trip_keeps_text_targets_kinds_meta_and_exact_pixels(tmp_path):
    frames = [picture(10 + i) for i in range(3)]
    originals = [
        caption_sample("coco/123.jpg", picture(1), "A red square.", image_id=123),
        vqa_sample("q 7", picture(2), "what colour?", "red", answers=["red", "red", "crimson"]),
        video_qa_sample("vid", frames, "how many?", "three"),
        Sample("doc", "interleaved", [Text("intro ", target=False), Image(picture(3)), Text("mid"), Video(frames[:2]), Text("end")], {"n": 1}),
    ]
    write(tmp_path, originals)
    stats = ReadStats()
    back = list(read_shards(tmp_path, stats=stats))
    assert stats.samples == 4 and stats.skipped == 0
    assert keys(back) == ["coco/123.jpg", "q 7", "vid", "doc"]  # dots, slashes, spaces survive via the JSON
    for a, b in zip(originals, back):
        assert (a.kind, a.meta) == (b.kind, b.meta)
        assert [type(s) for s in a.segments] == [type(s) for s in b.segments]
        for sa, sb in zip(a.segments, b.segments):
            if isinstance(sa, Text):
                assert (sa.text, sa.target) == (sb.text, sb.target)
            elif isinstance(sa, Video):
                assert len(sa.frames) == len(sb.frames)
        assert len(a.images()) == len(b.images())
        for ia, ib in zip(a.images(), b.images()):
            assert ib.mode == "RGB"
            assert np.array_equal(pixels(ia), pixels(ib))


def test_tar_members_use_dot_free_keys_and_numbered_pngs(tmp_path):
    (path,) = write(tmp_path, [video_qa_sample("a.b/c", [picture(0), picture(1)], "q", "a")])
    with tarfile.open(path) as tar:
        names = tar.getnames()
    assert names == ["a_b_c.000.png", "a_b_c.001.png", "a_b_c.json"]


def test_record_functions_are_inverse_and_reject_bad_indices():
    sample = Sample("k", "interleaved", [Image(picture(0)), Text("x", target=False), Video([picture(1), picture(2)])])
    record = sample_to_record(sample)
    assert record["segments"] == [{"image": 0}, {"text": "x", "target": False}, {"video": [1, 2]}]
    assert len(record["images"]) == 3
    back = record_to_sample(record)
    assert back.key == "k" and np.array_equal(pixels(back.images()[2]), pixels(picture(2)))
    with pytest.raises(ValueError, match="outside"):
        record_to_sample(dict(record, segments=[{"image": 3}]))


def test_rolls_over_every_max_samples_and_writes_index(tmp_path):
    samples = captions(5) + [vqa_sample(f"v{i}", picture(i), "q", "a") for i in range(2)]
    paths = write(tmp_path, samples, prefix="part", max_samples=3)
    assert [p.name for p in paths] == ["part-00000.tar", "part-00001.tar", "part-00002.tar"]
    index = json.loads((tmp_path / "index.json").read_text())
    assert index == {"shards": ["part-00000.tar", "part-00001.tar", "part-00002.tar"], "counts": {"caption": 5, "vqa": 2}, "total": 7}
    assert keys(read_shards(paths[1])) == ["s3", "s4", "v0"]
    assert keys(read_shards(tmp_path)) == keys(samples)
    assert keys(read_shards(str(tmp_path / "part-0000[02].tar"))) == ["s0", "s1", "s2", "v1"]


def test_existing_shards_are_not_silently_mixed_with_new_ones(tmp_path):
    write(tmp_path, captions(4), max_samples=2)
    with pytest.raises(DataError, match="already holds shards"):
        ShardWriter(tmp_path)
    write(tmp_path, captions(1), max_samples=2, overwrite=True)
    assert keys(read_shards(tmp_path)) == ["s0"]


def rewrite_member(path, name, data: bytes):
    """Copy a tar with one member's bytes replaced."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, content in members:
            content = data if m.name == name else content
            m.size = len(content)
            tar.addfile(m, io.BytesIO(content))


def test_corrupt_png_and_bad_json_are_skipped_and_counted(tmp_path):
    (path,) = write(tmp_path, captions(4))
    rewrite_member(path, "s1.000.png", b"\x89PNG not really a png")
    rewrite_member(path, "s2.json", b'{"kind": "caption", "segm')
    stats = ReadStats()
    assert keys(read_shards(path, stats=stats)) == ["s0", "s3"]
    assert (stats.samples, stats.skipped) == (2, 2)
    assert any("'s1'" in e for e in stats.errors) and any("'s2'" in e for e in stats.errors)
    assert "2 samples read, 2 skipped" in stats.summary()


def test_wrong_schema_and_out_of_range_index_are_skipped(tmp_path):
    (path,) = write(tmp_path, captions(3))
    rewrite_member(path, "s0.json", json.dumps({"kind": "caption", "segments": [{"image": 5}]}).encode())
    rewrite_member(path, "s1.json", json.dumps(["not", "an", "object"]).encode())
    stats = ReadStats()
    assert keys(read_shards(path, stats=stats)) == ["s2"]
    assert stats.skipped == 2


def test_truncated_tar_yields_what_precedes_the_damage_then_reads_next_shard(tmp_path):
    first, second = write(tmp_path, captions(12), max_samples=6)
    data = first.read_bytes()
    cut = (len(data) // 2 // 512) * 512 + 100  # mid-block, so the damage is certain to be noticed
    first.write_bytes(data[:cut])
    stats = ReadStats()
    got = keys(read_shards(tmp_path, stats=stats))
    n_before = len(got) - 6
    assert 1 <= n_before < 6
    assert got == [f"s{i}" for i in range(n_before)] + [f"s{i}" for i in range(6, 12)]
    assert stats.skipped >= 1 and any(first.name in e and "damaged" in e for e in stats.errors)


def test_skip_resumes_at_the_right_sample_with_and_without_shuffle(tmp_path):
    write(tmp_path, captions(10), max_samples=4)
    assert keys(read_shards(tmp_path, skip=7)) == ["s7", "s8", "s9"]
    full = keys(read_shards(tmp_path, shuffle_buffer=4, seed=3))
    assert keys(read_shards(tmp_path, shuffle_buffer=4, seed=3, skip=6)) == full[6:]


def test_skip_counts_only_good_samples(tmp_path):
    (path,) = write(tmp_path, captions(5))
    rewrite_member(path, "s1.000.png", b"garbage")
    assert keys(read_shards(path)) == ["s0", "s2", "s3", "s4"]
    assert keys(read_shards(path, skip=2)) == ["s3", "s4"]


def test_shuffle_is_a_seeded_permutation(tmp_path):
    write(tmp_path, captions(20), max_samples=7)
    plain = keys(read_shards(tmp_path))
    a = keys(read_shards(tmp_path, shuffle_buffer=8, seed=1))
    b = keys(read_shards(tmp_path, shuffle_buffer=8, seed=1))
    c = keys(read_shards(tmp_path, shuffle_buffer=8, seed=2))
    assert a == b
    assert sorted(a) == sorted(plain) and len(a) == 20
    assert a != plain and a != c


def test_bad_paths_raise_data_error_at_call_time(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_shards(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no .tar shards"):
        read_shards(tmp_path)
    with pytest.raises(DataError, match="matches no shard files"):
        read_shards(str(tmp_path / "*.tar"))


def test_interrupted_writer_keeps_finished_shards_and_leaves_no_partial_one(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, max_samples=3) as writer:
            for s in captions(7):
                writer.write(s)
            raise RuntimeError("killed")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["shard-00000.tar", "shard-00001.tar"]  # the 7th sample's shard is gone, no index
    assert keys(read_shards(tmp_path)) == [f"s{i}" for i in range(6)]


def test_killed_writer_leaves_only_a_tmp_name_that_readers_ignore(tmp_path):
    writer = ShardWriter(tmp_path, max_samples=2)
    for s in captions(3):
        writer.write(s)
    # No close(): as if the process died. The unfinished shard has a name no reader picks up.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.tar", "shard-00001.tar.tmp"]
    assert keys(read_shards(tmp_path)) == ["s0", "s1"]
    writer.abort()


def undecodable_png(image: PILImage.Image) -> bytes:
    """A PNG whose chunks all carry the right checksums (verify() passes) but whose pixel data is not zlib data."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    at = data.index(b"IDAT")
    length = int.from_bytes(data[at - 4 : at], "big")
    garbage = bytes(length)
    data[at + 4 : at + 4 + length] = garbage
    data[at + 4 + length : at + 8 + length] = zlib.crc32(b"IDAT" + garbage).to_bytes(4, "big")
    return bytes(data)


def test_pixels_that_pass_verify_but_do_not_decode_skip_their_sample_where_it_is_decoded(tmp_path):
    (path,) = write(tmp_path, captions(6))
    rewrite_member(path, "s2.000.png", undecodable_png(picture(2)))
    stats = ReadStats()
    assert keys(read_shards(path, stats=stats)) == ["s0", "s1", "s3", "s4", "s5"] and stats.skipped == 1
    lazy = list(read_shards(path, pixels=False))  # opened, not decoded: the failure waits for load_pictures
    assert keys(lazy) == [f"s{i}" for i in range(6)]
    load_pictures(lazy[0])
    with pytest.raises(OSError):
        load_pictures(lazy[2])
    stream = MixedStream({"c": tmp_path}, {}, lambda s: s.key, list, 6, shuffle_buffer=0)
    assert stream.next_batch() == ["s0", "s1", "s3", "s4", "s5"]
    assert stream.report()["skipped"] == 1 and "'s2' skipped while decoding" in stream.report()["errors"][0]


def test_a_rank_decodes_the_pictures_of_its_own_part_of_a_batch_alone(tmp_path, monkeypatch):
    write(tmp_path, captions(8))
    decoded = []
    monkeypatch.setattr(loader, "load_pictures", lambda sample: decoded.append(sample.key) or load_pictures(sample))
    batch = MixedStream({"c": tmp_path}, {}, lambda s: s, list, 8, shuffle_buffer=0, part=(1, 2)).next_batch()
    assert decoded == keys(batch) == ["s4", "s5", "s6", "s7"]
    assert batch[0].segments[0].image.getpixel((0, 0)) == picture(4).getpixel((0, 0))

"""Conversation data: Shapes World's conversation kind (shared/shapes-world.md, "Conversations") and LLaVA-format JSON,
both to conversation samples and shards."""

import json

import numpy as np
import pytest
from PIL import Image as PILImage

from nextmm.cli import main
from nextmm.config import make_config
from nextmm.data.formats import convert, read_llava
from nextmm.data.sample import Image, Text, Turn, Video
from nextmm.data.shards import DataError, ReadStats, read_shards
from nextmm.tokenizer import loc_text
from nextmm.worlds.shapes import generator as S
from nextmm.worlds.shapes.judge import judge, objects_in_caption


def turns_of(sample) -> list[tuple[str, list]]:
    """(role, segments) of each turn, in order (a system message before them left out)."""
    out = []
    for seg in sample.segments:
        if isinstance(seg, Turn):
            out.append((seg.role, []))
        elif out:
            out[-1][1].append(seg)
    return out


# ----------------------------------------------------------------------------- Shapes World conversations


def test_shapes_conversations_follow_the_spec_turn_by_turn():
    samples = list(S.make_samples("conversation", 5, 60))
    assert len(samples) == 60 and S.KINDS[-1] == "conversation"
    seen = set()
    for sample in samples:
        turns, records = turns_of(sample), sample.meta["turns"]
        assert sample.kind == "conversation" and 1 <= len(records) <= 4
        assert [role for role, _ in turns] == ["user", "assistant"] * len(records)
        first = turns[0][1][0]
        assert isinstance(first, Image if sample.meta["picture"] == "image" else Video)
        assert not any(isinstance(s, (Image, Video)) for _, segs in turns[2::2] for s in segs)  # only the first user turn shows it
        objects = [S.Obj.from_dict(o) for o in sample.meta["objects"]]
        asked = [r["question"] for r in records if r["type"] != "draw"]
        assert len(set(asked)) == len(asked)  # no question twice
        for k, record in enumerate(records):
            (_, user), (_, answer) = turns[2 * k], turns[2 * k + 1]
            question = user[-1]
            assert isinstance(question, Text) and not question.target and question.text == record["question"]
            kind = record["type"]
            seen.add(kind)
            if kind == "draw":
                (picture,) = answer
                assert isinstance(picture, Image) and record["question"] == f"draw {record['answer']}."
                drawn = [(o["size"], o["colour"], o["shape"]) for o in record["objects"]]
                assert sorted(objects_in_caption(record["answer"])) == sorted(drawn)
                assert sorted(o.triple for o in judge(picture.image)) == sorted(drawn)  # the picture is the caption's scene
                continue
            (text,) = answer
            assert isinstance(text, Text) and text.target and text.text == record["answer"]
            if kind == "caption":
                assert record["question"] == "describe the picture." and record["answer"] == S.Scene(objects).caption()
            elif kind == "video_caption":
                clip = S.VideoClip(objects, sample.meta["mover"], sample.meta["direction"], sample.meta["speed"])
                assert record["question"] == "what happens in the video?" and record["answer"] == clip.caption()
                assert [np.asarray(f).tobytes() for f in first.frames] == [np.asarray(f).tobytes() for f in clip.frames()]
            elif kind == "ground":
                (named,) = [o for o in objects if record["question"] == f"where is the a {o.size} {o.colour} {o.shape}?"]
                assert record["box"] == list(named.box) and record["answer"] == loc_text(named.box, S.CANVAS)
            elif kind == "vqa" and record["template"] == "exists":
                colour, shape = record["question"].rstrip("?").split()[-2:]
                assert record["answer"] == ("yes" if any((o.colour, o.shape) == (colour, shape) for o in objects) else "no")
            elif kind == "vqa":
                fixed = S.Scene(objects).questions(np.random.default_rng(0))  # every template but "exists" is the scene's alone
                assert (record["template"], record["question"], record["answer"]) in fixed
            else:
                assert kind == "video_qa"
                clip = S.VideoClip(objects, sample.meta["mover"], sample.meta["direction"], sample.meta["speed"])
                assert (record["template"], record["question"], record["answer"]) in clip.questions()
        if sample.meta["picture"] == "image":
            assert np.array_equal(np.asarray(first.image), np.asarray(S.render(objects)))
    assert seen == {"caption", "vqa", "ground", "draw", "video_caption", "video_qa"}


def test_a_new_kind_leaves_the_other_kinds_and_the_default_data_as_they_were(tmp_path, capsys):
    # The kinds before it keep their salt, so the data they write is unchanged.
    assert [S.KIND_SALT[k] for k in S.KINDS[:-1]] == list(range(1000, 1000 + len(S.KINDS) - 1))
    cfg = make_config("tiny")
    assert "conversation" not in cfg.data.counts and cfg.pretrain.mix["conversation"] == 0
    code = main(["data", "shapes", "--out", str(tmp_path / "d"), "--only", "--count", "conversation=3", "--count", "caption=2"])
    assert code == 0 and json.loads(capsys.readouterr().out)["samples"] == {"conversation": 3, "caption": 2}
    back = list(read_shards(tmp_path / "d" / "conversation"))
    assert sorted(s.key for s in back) == [f"conversation-0-{i:07d}" for i in range(3)]
    assert [r.role for r in back[0].segments if isinstance(r, Turn)][:2] == ["user", "assistant"]
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["caption", "conversation"]
    code = main(["data", "shapes", "--out", str(tmp_path / "e"), "--only"])
    assert code == 2 and "--count" in capsys.readouterr().err


def test_stage_one_leaves_a_conversation_source_out_unless_weighted(tmp_path):
    from nextmm.data.loader import MixedStream

    sources = {"caption": tmp_path / "caption", "conversation": tmp_path / "conversation"}
    stream = MixedStream(sources, make_config("tiny").pretrain.mix, lambda s: s, list, 2)
    assert stream.names == ["caption"]


# ----------------------------------------------------------------------------- LLaVA


def save_png(path, seed: int, size=(12, 9)) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(pixels, "RGB").save(path)
    return pixels


@pytest.fixture
def llava(tmp_path):
    root = tmp_path / "media"
    pix = {name: save_png(root / f"{name}.png", i) for i, name in enumerate(["a", "b1", "b2", "d1"])}
    frames = [save_png(root / "clip" / f"f{i}.png", 10 + i) for i in (2, 1, 3)]  # written out of order
    human, gpt = "human", "gpt"
    records = [
        {"id": "a", "image": "a.png", "conversations": [
            {"from": "system", "value": "you look at pictures"},
            {"from": human, "value": "<image>\nWhat colour is it?"}, {"from": gpt, "value": "red"},
            {"from": human, "value": "And its shape?"}, {"from": gpt, "value": "a square"}]},
        {"id": "b", "image": ["b1.png", "b2.png"], "conversations": [
            {"from": human, "value": "Compare <image> with <image>."}, {"from": gpt, "value": "the first is darker"}]},
        {"id": "c", "video": "clip", "conversations": [
            {"from": human, "value": "<video>\nwhat happens?"}, {"from": gpt, "value": "it moves"}]},
        {"id": "text", "conversations": [{"from": human, "value": "hello"}, {"from": gpt, "value": "hi"}]},
        {"id": "drawn", "image": "a.png", "conversations": [{"from": human, "value": "draw it"}, {"from": gpt, "value": "<image>"}]},
        {"id": "missing", "image": "nowhere.png", "conversations": [{"from": human, "value": "<image>\nwhat?"}, {"from": gpt, "value": "x"}]},
        {"id": "short", "image": "d1.png", "conversations": [{"from": human, "value": "<image> and <image>?"}, {"from": gpt, "value": "x"}]},
        {"id": "role", "conversations": [{"from": human, "value": "hi"}, {"from": "bot", "value": "x"}]},
        {"id": "order", "conversations": [{"from": human, "value": "hi"}, {"from": human, "value": "hi?"}, {"from": gpt, "value": "x"}]},
        "not a record",
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    return path, root, pix, frames


def test_llava_records_become_conversations_in_shards_and_bad_ones_are_counted(llava, tmp_path):
    path, root, pix, frames = llava
    summary = convert("llava", tmp_path / "out", json_path=path, image_dir=root, progress=False)
    assert (summary["samples"], summary["skipped"], summary["counts"]) == (5, 5, {"conversation": 5})
    back = {s.meta["id"]: s for s in read_shards(tmp_path / "out")}
    assert sorted(back) == ["a", "b", "c", "drawn", "text"]

    a = back["a"]
    assert isinstance(a.segments[0], Text) and a.segments[0].text == "you look at pictures" and not a.segments[0].target
    (_, u1), (_, a1), (_, u2), (_, a2) = turns_of(a)
    assert isinstance(u1[0], Image) and np.array_equal(np.asarray(u1[0].image), pix["a"])
    assert [(t.text, t.target) for t in u1[1:] + a1 + u2 + a2] == [("What colour is it?", False), ("red", True), ("And its shape?", False), ("a square", True)]

    (_, user), (_, answer) = turns_of(back["b"])
    assert [type(s).__name__ for s in user] == ["Text", "Image", "Text", "Image", "Text"]
    assert [s.text for s in user if isinstance(s, Text)] == ["Compare", "with", "."]
    assert np.array_equal(np.asarray(user[1].image), pix["b1"]) and np.array_equal(np.asarray(user[3].image), pix["b2"])
    assert [(s.text, s.target) for s in answer] == [("the first is darker", True)]

    (_, user), _ = turns_of(back["c"])
    assert isinstance(user[0], Video) and [np.asarray(f).tobytes() for f in user[0].frames] == [f.tobytes() for f in (frames[1], frames[0], frames[2])]
    (_, user), (_, answer) = turns_of(back["drawn"])  # a picture in a gpt turn is one the assistant draws
    assert [s.text for s in user] == ["draw it"] and isinstance(answer[0], Image) and np.array_equal(np.asarray(answer[0].image), pix["a"])
    # across every conversation, the learned text is the gpt turns' and nothing else
    learned = [s.text for sample in back.values() for s in sample.segments if isinstance(s, Text) and s.target]
    assert sorted(learned) == sorted(["red", "a square", "the first is darker", "it moves", "hi"])


def test_each_bad_llava_record_is_skipped_with_its_reason(llava):
    path, root, _, _ = llava
    stats = ReadStats()
    assert [s.meta["id"] for s in read_llava(path, root, stats=stats)] == ["a", "b", "c", "text", "drawn"]
    assert (stats.samples, stats.skipped) == (5, 5)
    reasons = "\n".join(stats.errors)
    for why in ("'missing'", "nowhere.png", "place 2 <image>", "from 'bot'", "alternate", "#9", "not an object"):
        assert why in reasons, why


def test_a_file_that_is_not_llava_stops_with_one_sentence(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"conversations": []}))
    with pytest.raises(DataError, match="not a list of records"):
        read_llava(path, tmp_path)


def test_nextmm_data_llava_writes_shards(llava, tmp_path, capsys):
    path, root, _, _ = llava
    code = main(["data", "llava", "--json", str(path), "--images", str(root), "--out", str(tmp_path / "cli"), "--max-frames", "2"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and (summary["samples"], summary["skipped"]) == (5, 5)
    video = next(s for s in read_shards(tmp_path / "cli") if s.meta["id"] == "c").segments[1]
    assert isinstance(video, Video) and len(video.frames) == 2

import json

import numpy as np
import pytest
from PIL import Image as PILImage

from nextmm.data.formats import convert, load_image, read_coco_captions, read_mmc4, read_video_folders, read_vqav2
from nextmm.data.sample import Image, Text, Video, vqa_prompt
from nextmm.data.shards import DataError, ReadStats, read_shards


def save_picture(path, seed: int, size=(10, 8)) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(pixels, "RGB").save(path)  # PNG: lossless, so pixels can be compared exactly
    return pixels


def write_json(path, data) -> None:
    path.write_text(json.dumps(data))


@pytest.fixture
def coco(tmp_path):
    images = tmp_path / "images"
    pix = {i: save_picture(images / f"{i}.png", i) for i in (1, 2)}
    data = {
        "images": [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": "2.png"}, {"id": 3, "file_name": "3.png"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "  A Red square. \n"},
            {"id": 11, "image_id": 2, "caption": "two circles"},
            {"id": 12, "image_id": 3, "caption": "an image nobody saved"},
            {"id": 13, "image_id": 1, "caption": "another caption"},
        ],
    }
    write_json(tmp_path / "captions.json", data)
    return tmp_path / "captions.json", images, pix


def test_coco_captions_round_trip_through_shards(coco, tmp_path):
    ann, images, pix = coco
    summary = convert("coco", tmp_path / "out", annotations_json=ann, image_dir=images, progress=False)
    assert summary["samples"] == 3 and summary["skipped"] == 1 and summary["shards"] == ["coco-00000.tar"]
    assert "3.png" in summary["errors"][0]
    back = {s.meta["file_name"] + s.segments[1].text: s for s in read_shards(tmp_path / "out")}
    assert sorted(back) == ["1.pngA Red square.", "1.pnganother caption", "2.pngtwo circles"]
    sample = back["1.pngA Red square."]
    assert sample.kind == "caption" and sample.meta["image_id"] == 1
    assert np.array_equal(np.asarray(sample.segments[0].image), pix[1])
    assert np.array_equal(np.asarray(back["2.pngtwo circles"].images()[0]), pix[2])


def test_coco_missing_image_is_skipped_and_counted(coco):
    ann, images, _ = coco
    stats = ReadStats()
    samples = list(read_coco_captions(ann, images, stats=stats))
    assert [s.segments[1].text for s in samples] == ["A Red square.", "another caption", "two circles"]
    assert (stats.samples, stats.skipped) == (3, 1)
    assert "does not exist" in stats.errors[0]


def test_coco_wrong_schema_raises_naming_the_file(tmp_path):
    path = tmp_path / "instances.json"
    write_json(path, {"images": [], "categories": []})
    with pytest.raises(DataError, match=r"instances\.json.*'annotations'"):
        read_coco_captions(path, tmp_path)
    write_json(path, [1, 2])
    with pytest.raises(DataError, match=r"instances\.json.*JSON list"):
        read_coco_captions(path, tmp_path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_coco_captions(path, tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        read_coco_captions(tmp_path / "missing.json", tmp_path)


def test_vqav2_with_coco_file_names(tmp_path):
    images = tmp_path / "val2014"
    pix = save_picture(images / "COCO_val2014_000000000042.png", 42)
    save_picture(images / "COCO_val2014_000000000007.png", 7)
    (images / "notes.txt").write_text("not an image")
    questions = {"questions": [
        {"image_id": 42, "question": "What colour is the square?", "question_id": 420},
        {"image_id": 7, "question": "How many?", "question_id": 70},
        {"image_id": 99, "question": "No image for me?", "question_id": 990},
    ]}
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(["red"] * 8 + ["crimson", "pink"])]
    annotations = {"annotations": [
        {"question_id": 420, "image_id": 42, "multiple_choice_answer": "red", "answers": answers, "question_type": "what color is the", "answer_type": "other"},
        {"question_id": 70, "image_id": 7, "multiple_choice_answer": "2", "answers": [], "question_type": "how many", "answer_type": "number"},
        {"question_id": 990, "image_id": 99, "multiple_choice_answer": "yes", "answers": [], "question_type": "is", "answer_type": "yes/no"},
    ]}
    write_json(tmp_path / "q.json", questions)
    write_json(tmp_path / "a.json", annotations)
    stats = ReadStats()
    samples = list(read_vqav2(tmp_path / "q.json", tmp_path / "a.json", images, stats=stats))
    assert [s.key for s in samples] == ["vqa_420", "vqa_70"]
    assert stats.skipped == 1
    first = samples[0]
    assert first.kind == "vqa"
    assert [(s.text, s.target) for s in first.segments[1:]] == [(vqa_prompt("What colour is the square?"), False), ("red", True)]
    assert np.array_equal(np.asarray(first.segments[0].image), pix)
    assert first.meta["answers"] == ["red"] * 8 + ["crimson", "pink"]
    assert (first.meta["question_id"], first.meta["question_type"], first.meta["answer_type"]) == (420, "what color is the", "other")
    # An explicit file-name pattern finds the same image.
    again = list(read_vqav2(tmp_path / "q.json", tmp_path / "a.json", images, image_pattern="COCO_val2014_{image_id:012d}.png"))
    assert np.array_equal(np.asarray(again[0].images()[0]), pix)
    with pytest.raises(DataError, match="annotations"):
        read_vqav2(tmp_path / "q.json", None, images)
    with pytest.raises(DataError, match=r"a\.json.*'questions'"):
        read_vqav2(tmp_path / "a.json", tmp_path / "a.json", images)


def test_mmc4_places_images_before_matched_text_and_drops_bad_ones(tmp_path):
    images = tmp_path / "imgs"
    pa = save_picture(images / "a.png", 1)
    pb = save_picture(images / "b.png", 2)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    docs = [
        {"text_list": ["First.", "Second.", "Third."], "url": "http://x",
         "image_info": [{"image_name": "b.png", "matched_text_index": 2, "matched_sim": 0.3},
                        {"image_name": "a.png", "matched_text_index": 0, "matched_sim": 0.2},
                        {"image_name": "gone.png", "matched_text_index": 1},
                        {"image_name": "broken.jpg", "matched_text_index": 1}]},
        {"text_list": ["Only text."], "image_info": []},
    ]
    lines = [json.dumps(docs[0]), '{"text_list": ["cut off', "", json.dumps(docs[1])]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    stats = ReadStats()
    samples = list(read_mmc4(tmp_path / "docs.jsonl", images, stats=stats))
    assert len(samples) == 2 and stats.skipped == 3  # gone.png, broken.jpg, the bad line
    doc = samples[0]
    assert doc.kind == "interleaved" and doc.meta["url"] == "http://x"
    assert [type(s) for s in doc.segments] == [Image, Text, Text, Image, Text]
    assert [s.text for s in doc.segments if isinstance(s, Text)] == ["First.", "Second.", "Third."]
    assert np.array_equal(np.asarray(doc.segments[0].image), pa)
    assert np.array_equal(np.asarray(doc.segments[3].image), pb)
    assert any("docs.jsonl:2" in e for e in stats.errors)
    assert [type(s) for s in samples[1].segments] == [Text]


def test_mmc4_wrong_schema_raises(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"caption": "a coco record"}) + "\n")
    with pytest.raises(DataError, match=r"x\.jsonl.*text_list"):
        read_mmc4(tmp_path / "x.jsonl", tmp_path)


def test_video_folders_give_sorted_frames_and_skip_folders_without_caption(tmp_path):
    root = tmp_path / "videos"
    frames = {name: save_picture(root / "clip1" / name, i) for i, name in enumerate(["f10.png", "f02.png", "f01.png"])}
    (root / "clip1" / "caption.txt").write_text("a ball rolls\n")
    write_json(root / "clip1" / "qa.json", [{"question": "what rolls?", "answer": "a ball"}, {"question": "no answer"}])
    save_picture(root / "clip2" / "f0.png", 9)  # no caption.txt
    (root / "clip3").mkdir()
    (root / "clip3" / "caption.txt").write_text("no frames here")
    stats = ReadStats()
    samples = list(read_video_folders(root, stats=stats))
    assert [s.kind for s in samples] == ["video_caption", "video_qa"]
    assert stats.skipped == 3  # clip2, clip3, the qa item without an answer
    video = samples[0].segments[0]
    assert isinstance(video, Video) and samples[0].segments[1].text == "a ball rolls"
    for frame, name in zip(video.frames, ["f01.png", "f02.png", "f10.png"]):
        assert np.array_equal(np.asarray(frame), frames[name])
    assert samples[1].segments[-1].text == "a ball" and samples[1].meta["question"] == "what rolls?"


def test_video_max_frames_subsamples_uniformly(tmp_path):
    root = tmp_path / "videos"
    for i in range(10):
        save_picture(root / "clip" / f"{i:02d}.png", i)
    (root / "clip" / "caption.txt").write_text("ten frames")
    (sample,) = read_video_folders(root, max_frames=3)
    assert sample.meta["frame_files"] == ["01.png", "05.png", "08.png"]
    assert len(sample.segments[0].frames) == 3
    with pytest.raises(DataError, match="no subfolders"):
        read_video_folders(root / "clip")


def test_load_image_errors_and_max_side(tmp_path):
    save_picture(tmp_path / "big.png", 0, size=(40, 20))
    assert load_image(tmp_path / "big.png", max_side=10).size == (10, 5)
    assert load_image(tmp_path / "big.png").size == (40, 20)
    with pytest.raises(DataError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n garbage")
    with pytest.raises(DataError, match=r"bad\.png.*could not be decoded"):
        load_image(tmp_path / "bad.png")


def test_convert_rejects_unknown_source_and_missing_paths(tmp_path):
    with pytest.raises(DataError, match="unknown data source"):
        convert("laion", tmp_path / "out")
    with pytest.raises(DataError, match="image_dir"):
        convert("coco", tmp_path / "out", annotations_json=tmp_path / "a.json", progress=False)

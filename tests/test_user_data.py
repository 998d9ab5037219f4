"""A user's COCO-format captions train a model with no code change: convert, train, load, caption."""

import json

import numpy as np

from nextmm import api
from nextmm.cli import main
from nextmm.worlds.shapes import generator as shapes


def write_coco(root, n=24):
    images = root / "images"
    images.mkdir(parents=True)
    entries, annotations = [], []
    for i in range(n):
        scene = shapes.sample_scene(np.random.default_rng([9, i]))
        name = f"COCO_train2014_{i:012d}.jpg"
        scene.image().save(images / name, quality=95)
        entries.append({"id": i, "file_name": name, "width": 64, "height": 64})
        annotations.append({"id": 1000 + i, "image_id": i, "caption": scene.caption().capitalize() + "."})
    (root / "captions.json").write_text(json.dumps({"images": entries, "annotations": annotations}))
    return root / "captions.json", images


def test_coco_captions_convert_train_and_caption(tmp_path, capsys):
    ann, images = write_coco(tmp_path / "coco")
    assert main(["data", "coco", "--annotations", str(ann), "--images", str(images), "--out", str(tmp_path / "shards")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 24 and summary["skipped"] == 0
    code = main([
        "train", "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "run"), "--preset", "micro",
        "--set", "clip.steps=2", "--set", "pretrain.steps=3", "--set", "pretrain.batch_size=8",
        "--set", "clip.time_budget_s=0", "--set", "pretrain.time_budget_s=0",
    ])
    assert code == 0
    m = api.load(tmp_path / "run" / "model")
    captions = m.caption([images / "COCO_train2014_000000000003.jpg"])
    assert len(captions) == 1 and isinstance(captions[0], str)

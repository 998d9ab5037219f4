"""Every user mistake ends in one clear sentence (exit 2), never a traceback."""

import json
from pathlib import Path

import numpy as np
import pytest

from nextmm.cli import main, parse_prompt
from nextmm.errors import UserError
from nextmm.worlds.shapes import generator as shapes


@pytest.fixture()
def model_dir(tmp_path, micro_nextmm):
    return str(micro_nextmm.save(tmp_path / "model"))


@pytest.fixture()
def image_file(tmp_path):
    path = tmp_path / "scene.png"
    shapes.sample_scene(np.random.default_rng(0)).image().save(path)
    return str(path)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_clear_line(code, err, *words):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nextmm: error:"), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


def test_caption_and_ask_print_model_output(capsys, model_dir, image_file):
    code, out, _ = run(capsys, "caption", "--model", model_dir, image_file, image_file)
    assert code == 0 and out.count(image_file) == 2
    code, out, _ = run(capsys, "ask", "--model", model_dir, "--image", image_file, "what color is the circle?")
    assert code == 0 and out.endswith("\n")


def test_missing_image(capsys, model_dir, tmp_path):
    missing = str(tmp_path / "nope.png")
    assert_one_clear_line(*run(capsys, "caption", "--model", model_dir, missing)[::2], "nope.png")


def test_corrupt_image(capsys, model_dir, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG but not really")
    assert_one_clear_line(*run(capsys, "caption", "--model", model_dir, str(bad))[::2], "bad.png")


def test_not_a_model_directory(capsys, tmp_path, image_file):
    assert_one_clear_line(*run(capsys, "caption", "--model", str(tmp_path), image_file)[::2], "not a nextmm model directory")


def test_weights_that_do_not_fit_the_config(capsys, model_dir, image_file):
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config["llm"]["layers"] += 1
    (Path(model_dir) / "config.json").write_text(json.dumps(config))
    assert_one_clear_line(*run(capsys, "caption", "--model", model_dir, image_file)[::2], "model.safetensors", "do not fit", "retrain")


# in the order they were added: a model saved before one existed has none of the later ones either
LATER_PARTS = [
    ("resampler", "region_coords", "resampler.coord_proj."), ("llm", "location_head", "location_head."),
    ("llm", "location_pointer", "location_head.pointer."), ("llm", "presence", "presence."), ("llm", "agreement", "agreement."),
]


@pytest.mark.parametrize("added", range(len(LATER_PARTS) + 1))
def test_a_model_saved_before_a_later_part_existed_or_before_the_heads_section_still_loads(capsys, model_dir, image_file, added):
    """The model directory rewritten as models were saved before the config's `heads` section (the heads'
    switches in `llm`, their weights at the model's top level), less the parts added after `added`."""
    from safetensors.torch import load_file, save_file

    from nextmm.config import HEAD_SWITCHES_IN_LLM
    from nextmm.heads import OLD_NAMES

    code, before, _ = run(capsys, "caption", "--model", model_dir, image_file)
    assert code == 0
    longest_first = sorted(OLD_NAMES.items(), key=lambda pair: -len(pair[1]))
    old_name = lambda name: next((old + name[len(new):] for old, new in longest_first if name.startswith(new)), name)  # noqa: E731
    weights = {old_name(name): w for name, w in load_file(Path(model_dir) / "model.safetensors").items()}
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config["llm"].update({old: config["heads"][new] for old, new in HEAD_SWITCHES_IN_LLM.items()})
    del config["heads"]
    missing = LATER_PARTS[added:]
    kept = {name: w for name, w in weights.items() if not name.startswith(tuple(prefix for _, _, prefix in missing))}
    assert len(kept) < len(weights) or not missing
    save_file(kept, Path(model_dir) / "model.safetensors")
    for part, key, _ in missing:
        del config[part][key]
    (Path(model_dir) / "config.json").write_text(json.dumps(config))
    code, out, _ = run(capsys, "caption", "--model", model_dir, image_file)
    assert code == 0 and image_file in out
    if not missing:
        assert out == before  # every part, under its old name: the same model


def test_unknown_preset_and_unknown_key(capsys, tmp_path):
    assert_one_clear_line(*run(capsys, "train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--preset", "giant")[::2], "giant")
    assert_one_clear_line(*run(capsys, "train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "llm.depth=3")[::2], "llm.depth")
    # a head's switch under its old name says where it went
    assert_one_clear_line(*run(capsys, "train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "llm.copy_head=false")[::2], "llm.copy_head", "heads.copy")


def test_a_bad_pretrained_decoder_stops_training_before_it_starts(capsys, tmp_path):
    from nextmm.data.make import write_shapes

    write_shapes(tmp_path / "data", {"caption": 8}, seed=0, shard_size=8)
    capsys.readouterr()  # the writer's progress bar
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"), "--preset", "micro",
                       "--set", f"decoder.pretrained={tmp_path}")
    assert_one_clear_line(code, err, "decoder directory", "vae/")
    assert not (tmp_path / "o" / "clip").exists()


def test_data_directory_without_shards(capsys, tmp_path):
    assert_one_clear_line(*run(capsys, "train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--preset", "micro")[::2], "no .tar shards")


def test_wrong_schema_json(capsys, tmp_path):
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps({"questions": []}))
    code, _, err = run(capsys, "data", "coco", "--annotations", str(ann), "--images", str(tmp_path), "--out", str(tmp_path / "o"))
    assert_one_clear_line(code, err, "captions.json")


def test_complete_reads_the_placeholders_files_as_pictures(capsys, model_dir, image_file, monkeypatch):
    from nextmm.api import NextMM
    from nextmm.data.sample import Image, Text

    seen = []
    monkeypatch.setattr(NextMM, "generate_ids", lambda self, prompts, n=32, answers=None: seen.extend(prompts) or [[] for _ in prompts])
    code, _, _ = run(capsys, "complete", "--model", model_dir, "--image", image_file, "<image> this is a")
    assert code == 0
    assert [type(seg) for seg in seen[0]] == [Image, Text] and seen[0][1].text == "this is a"


def test_prompt_placeholders_must_match_files(capsys, model_dir, image_file):
    code, _, err = run(capsys, "complete", "--model", model_dir, "--image", image_file, "<image> this is a dax <image> this is a")
    assert_one_clear_line(code, err, "2 <image>", "1 --image")


def test_sequence_longer_than_context(capsys, model_dir, image_file):
    frames = [image_file] * 40
    code, _, err = run(capsys, "ask", "--model", model_dir, *sum((["--image", f] for f in frames), []), "which way?")
    assert_one_clear_line(code, err, "context")


def test_parse_prompt_interleaves_text_images_and_videos(tmp_path, image_file):
    frames = tmp_path / "clip"
    frames.mkdir()
    for name in ("b.png", "a.png"):
        (frames / name).write_bytes(b"")
    parts = parse_prompt("<image> this is a dax <video> it moves", [image_file], [str(frames)])
    assert parts == [Path(image_file), "this is a dax", [frames / "a.png", frames / "b.png"], "it moves"]
    with pytest.raises(UserError, match="empty"):
        parse_prompt("   ", [], [])


def test_python_m_nextmm_train_is_nextmm_train(tmp_path):
    """`torchrun ... -m nextmm.train ...` needs the module to run as `nextmm train`."""
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-m", "nextmm.train", "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: nextmm train")
    missing = subprocess.run([sys.executable, "-m", "nextmm.train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert missing.returncode == 2 and "none" in missing.stderr and "Traceback" not in missing.stderr

"""Drawing through the API and the CLI: regression loop -> visual decoder -> images, saved and loaded with
the model, and every bad input one clear sentence with no files left behind."""

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import nextmm
from nextmm.api import DrawError, NextMM
from nextmm.config import make_config
from nextmm.data.loader import discover_sources
from nextmm.data.make import write_shapes
from nextmm.data.sample import Image, Sample, Text, Video
from nextmm.data.shards import DataError
from nextmm.data.transforms import to_pixels
from nextmm.eval.images import held_out_scenes, regression_retrieval
from nextmm.models.decoder import VisualDecoder
from nextmm.train.decoder_stage import fit_semantic_readouts, picture_and_caption, training_condition
from nextmm.worlds.shapes import generator as shapes
from nextmm.worlds.shapes.judge import objects_in_caption
from test_cli import assert_one_clear_line, run


@pytest.fixture()
def drawer(micro_model, tokenizer, micro_config) -> NextMM:
    cfg = micro_config.decoder
    cfg.sample_steps = 3
    semantic = micro_config.clip_text.embed_dim
    decoder = VisualDecoder(cfg, micro_config.resampler.width, micro_config.resampler.num_queries, semantic_width=semantic)
    return NextMM(micro_model, tokenizer, micro_config, decoder=decoder, batch_size=3)


def pixel_gap(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


@pytest.fixture()
def scene_images():
    return [shapes.sample_scene(np.random.default_rng([5, i])).image() for i in range(2)]


def test_draw_makes_one_image_per_prompt_each_depending_only_on_its_prompt_seed_and_index(drawer, scene_images):
    prompts = ["a large red circle", [scene_images[0], "make the red circle blue"], scene_images, "a small blue square"]
    images = drawer.draw(prompts, seed=7)
    assert len(images) == 4 and all(isinstance(i, PILImage.Image) and i.size == (64, 64) for i in images)
    again = drawer.draw(prompts, seed=7)  # batch_size 3: the prompts run as two chunks both times
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))
    alone = drawer.draw(prompts[:1], seed=7)[0]
    assert pixel_gap(alone, images[0]) <= 2  # another batch shape rounds differently, by a level or two
    other_seed = drawer.draw(prompts[:1], seed=8)[0]
    assert pixel_gap(other_seed, images[0]) > 20
    assert len(drawer.draw(prompts[:1], negative="null", guidance=2.0)) == 1
    assert drawer.reconstruct(scene_images)[0].size == (64, 64)


def test_draw_keeps_the_candidate_the_model_judges_to_fit_its_text_best(drawer, monkeypatch):
    prompts = ["a large red circle", "a small blue square above a large green triangle"]
    singles = [drawer.draw(prompts, seed=5 + k) for k in range(3)]  # what candidate k is drawn from
    judged = []

    def brightness(self, images, texts):  # a stand-in judge whose favourite is easy to compute
        judged.append(list(texts))
        return torch.tensor([float(np.asarray(img, dtype=float).mean()) for img in images])

    monkeypatch.setattr(NextMM, "match_margins", brightness)
    chosen = drawer.draw(prompts, seed=5, candidates=3)
    assert judged == [prompts * 3]
    for i, image in enumerate(chosen):
        brightest = max((row[i] for row in singles), key=lambda img: np.asarray(img, dtype=float).mean())
        assert pixel_gap(image, brightest) == 0
    assert len({np.asarray(row[0]).tobytes() for row in singles}) == 3  # the candidates differ


def test_bad_drawing_options_are_refused_before_any_work(drawer, scene_images):
    for kwargs, words in [
        ({"prompts": [""]}, "prompt 1 is empty"),
        ({"prompts": ["a red circle"], "candidates": 0}, "candidates 0 is out of range"),
        ({"prompts": ["a red circle", [scene_images[0], "make it blue"]], "candidates": 2}, "prompt 2 holds pictures"),
        ({"prompts": ["a red circle"], "guidance": 0.5}, "guidance 0.5 is out of range"),
        ({"prompts": ["a red circle"], "steps": 0}, "steps 0 is out of range"),
        ({"prompts": ["a red circle"], "negative": "nothing"}, "negative is 'nothing'"),
    ]:
        with pytest.raises(DrawError, match=words):
            drawer.draw(**kwargs)


def test_a_model_without_a_decoder_says_how_to_get_one(micro_nextmm):
    with pytest.raises(DrawError, match="no visual decoder"):
        micro_nextmm.draw(["a large red circle"])


def test_the_decoder_is_saved_and_loaded_with_the_model(tmp_path, drawer):
    loaded = nextmm.load(drawer.save(tmp_path / "model"))
    assert (tmp_path / "model" / "decoder" / "unet" / "config.json").is_file()
    before, after = drawer.draw(["a large red circle"], seed=3)[0], loaded.draw(["a large red circle"], seed=3)[0]
    assert pixel_gap(before, after) == 0


def test_complete_draws_when_the_model_opens_an_image(drawer, monkeypatch):
    img, word = drawer.tokenizer.img_id, drawer.tokenizer.encode("circle")
    # The untrained model would rarely choose [IMG]; what matters here is what complete() does when it does.
    monkeypatch.setattr(NextMM, "generate_ids", lambda self, prompts, n=32, answers=None: [word + [img], word])
    drawn, plain = drawer.complete([["a large red"], ["a small"]])
    assert plain == "circle"
    assert drawn[0] == "circle" and isinstance(drawn[1], PILImage.Image)


def test_cli_draw_writes_numbered_pngs(capsys, tmp_path, drawer, scene_images):
    model = str(drawer.save(tmp_path / "model"))
    picture = tmp_path / "a.png"
    scene_images[0].save(picture)
    code, out, _ = run(capsys, "draw", "--model", model, "--out", str(tmp_path / "out"), "--num", "2", "--steps", "2", "a large red circle")
    assert code == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["draw-000.png", "draw-001.png"] and out.split() == [str(tmp_path / "out" / n) for n in written]
    code, _, _ = run(capsys, "draw", "--model", model, "--out", str(tmp_path / "edit"), "--image", str(picture), "--steps", "2",
                     "make the red circle blue")
    assert code == 0 and PILImage.open(tmp_path / "edit" / "draw-000.png").size == (64, 64)


def test_cli_draw_bad_inputs_are_one_sentence_and_leave_no_files(capsys, tmp_path, drawer):
    model = str(drawer.save(tmp_path / "model"))
    out = tmp_path / "out"
    cases = [
        (["draw", "--model", model, "--out", str(out), ""], "nothing to draw from"),
        (["draw", "--model", model, "--out", str(out), "--image", str(tmp_path / "missing.png")], "missing.png"),
        (["draw", "--model", model, "--out", str(out), "--guidance", "100", "a red circle"], "guidance 100.0 is out of range"),
        (["draw", "--model", model, "--out", str(out), "--steps", "0", "a red circle"], "steps 0 is out of range"),
        (["draw", "--model", model, "--out", str(out), "--candidates", "100", "a red circle"], "candidates 100 is out of range"),
    ]
    for argv, words in cases:
        code, _, err = run(capsys, *argv)
        assert_one_clear_line(code, err, words)
        assert not out.exists() or not any(out.iterdir())


def test_a_broken_decoder_folder_is_one_clear_error(capsys, tmp_path, drawer):
    model = drawer.save(tmp_path / "model")
    (model / "decoder" / "unet" / "config.json").write_text("{ not json")
    code, _, err = run(capsys, "draw", "--model", str(model), "--out", str(tmp_path / "out"), "a red circle")
    assert_one_clear_line(code, err, "decoder")


def test_the_drawing_score_is_perfect_on_true_renders_and_zero_on_blank_canvases():
    from nextmm.eval.images import _scores, held_out_scenes

    pairs = held_out_scenes(2, 20)
    captions = [c for c, _ in pairs]
    truth = _scores([img for _, img in pairs], captions)
    blank = _scores([PILImage.new("RGB", (64, 64), "white")] * len(pairs), captions)
    assert truth == {"all_objects_right": 1.0, "size_right": 1.0, "colour_right": 1.0, "shape_right": 1.0, "exact": 1.0}
    assert set(blank.values()) == {0.0}


def test_regress_is_what_draw_renders_and_embed_images_what_reconstruct_renders(drawer, scene_images, monkeypatch):
    prompts = ["a large red circle", [scene_images[0], "make the red circle blue"]]
    regressed = drawer.regress(prompts)
    n, width = drawer.config.resampler.num_queries, drawer.config.resampler.width
    assert regressed.shape == (2, n, width)
    embedded = drawer.embed_images(scene_images)
    assert embedded.shape == (2, n, width) and not torch.allclose(embedded[0], embedded[1])
    rendered = []
    monkeypatch.setattr(drawer, "_render", lambda decoder, condition, *rest, seen=False: rendered.append((condition, seen)) or [])
    drawer.draw(prompts, negative="null")
    drawer.reconstruct(scene_images)
    torch.testing.assert_close(rendered[0][0], regressed)
    torch.testing.assert_close(rendered[1][0], embedded)
    assert [seen for _, seen in rendered] == [False, True]  # the semantic token's read-out for each kind


def test_regression_retrieval_scores_the_nearest_gallery_picture(drawer, monkeypatch):
    scenes = held_out_scenes(1, 4 + 200)
    asked, gallery = scenes[:4], scenes[4:]
    colour_shape = lambda caption: objects_in_caption(caption)[0][1:]  # noqa: E731

    def regressing_pictures(pick):  # a stand-in LLM that regresses exactly the embeddings of a gallery picture
        chosen = [next(img for c, img in gallery if pick(colour_shape(c), colour_shape(p))) for p in prompts_of(asked)]
        return lambda prompts: drawer.embed_images(chosen)

    prompts_of = lambda pairs: [c for c, _ in pairs]  # noqa: E731
    monkeypatch.setattr(drawer, "regress", regressing_pictures(lambda got, want: got == want))
    assert regression_retrieval(drawer, prompts=4, gallery=200) == 1.0
    monkeypatch.setattr(drawer, "regress", regressing_pictures(lambda got, want: got[0] != want[0]))
    assert regression_retrieval(drawer, prompts=4, gallery=200) == 0.0


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_the_decoder_trains_on_the_llms_regression_from_a_caption_where_asked(drawer, scene_images, share):
    m = drawer
    images = scene_images + scene_images[:1]
    batch = {"pixels": to_pixels(images, m.config.vision.image_size), "captions": ["a large red circle", None, "a small blue square"]}
    condition, seen = training_condition(m.model, m.builder, batch, share, "fp32")
    assert seen.tolist() == [not share, True, not share]
    own = m.embed_images(images)
    regressed = m.regress(["a large red circle", "a small blue square"])
    assert condition.shape == own.shape
    torch.testing.assert_close(condition[1], own[1])  # no caption: always the image's own embeddings
    expected = regressed if share else own[[0, 2]]
    torch.testing.assert_close(condition[[0, 2]], expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(regressed, own[[0, 2]], atol=1e-3)


def test_a_captioned_picture_brings_its_caption_to_the_decoder_and_others_bring_none():
    picture = PILImage.new("RGB", (8, 8))
    assert picture_and_caption(Sample("a", "caption", [Image(picture), Text("a large red circle")])) == (picture, "a large red circle")
    asked = Sample("b", "vqa", [Image(picture), Text("question: how many objects are there? answer:", target=False), Text("one")])
    assert picture_and_caption(asked) == (picture, None)
    assert picture_and_caption(Sample("c", "video_caption", [Video([picture]), Text("a red circle moves left")])) == (picture, None)


@pytest.mark.parametrize("negative", ["null", "empty"])
def test_draw_guides_against_the_configs_negative_unless_told(drawer, monkeypatch, negative):
    drawer.config.decoder.negative = negative
    seen = []
    monkeypatch.setattr(drawer, "_render", lambda decoder, condition, against, *rest, **kw: seen.append(against) or [])
    drawer.draw(["a large red circle"])
    drawer.draw(["a large red circle"], negative="empty" if negative == "null" else "null")
    regressed_empty = drawer.regress([[]])
    told_empty = seen[1] if negative == "null" else seen[0]
    assert seen[0 if negative == "null" else 1] is None  # null: the decoder's own no-condition
    torch.testing.assert_close(told_empty, regressed_empty)


def test_data_without_captions_cannot_fit_the_semantic_token_and_says_what_to_do(tmp_path):
    write_shapes(tmp_path, {"vqa": 40}, seed=0, shard_size=20)
    with pytest.raises(DataError, match=r"0 captioned pictures among the first 272 .*decoder.semantic_token=false"):
        fit_semantic_readouts(make_config("micro"), discover_sources(tmp_path), None, None, None, None)


def test_noise_numbers_give_each_prompt_the_picture_it_gets_in_a_call_of_its_own(drawer):
    from nextmm.api import noise_numbers

    together = drawer.draw(["a large red circle", "a small blue square", "a small blue square"], noises=[0, 0, 1])
    alone = drawer.draw(["a large red circle"]) + drawer.draw(["a small blue square", "a small blue square"])
    # equal but for rounding: a batch's sums may run in another order
    assert all(pixel_gap(a, b) <= 2 for a, b in zip(together, alone))
    assert pixel_gap(together[1], together[2]) > 20  # another noise, another picture
    assert noise_numbers(2, 3) == [2_000_006, 2_000_007, 2_000_008]
    with pytest.raises(DrawError, match="2 prompts were given 1 noise numbers"):
        drawer.draw(["a", "b"], noises=[0])

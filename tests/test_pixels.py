import numpy as np
import pytest
from PIL import Image, ImageFilter

from nextmm.worlds.shapes import generator as shapes
from nextmm.worlds.shapes.judge import (
    JudgedObject,
    describe,
    judge,
    objects_in_caption,
    score_prompt,
)

N_SCENES = 300
SIDES = [*range(10, 17), *range(22, 31)]


@pytest.fixture(scope="module")
def scenes() -> list[shapes.Scene]:
    rng = np.random.default_rng(2024)
    return [shapes.sample_scene(rng) for _ in range(N_SCENES)]


def judged_right(scene: shapes.Scene, judged: list[JudgedObject], tol: int) -> bool:
    """Same objects, each box edge within `tol` px. Compared in (colour, shape) order, which the
    spec makes unique within a scene: caption order can flip when two centres are nearly level."""
    truth = sorted(scene.objects, key=lambda o: (o.colour, o.shape))
    judged = sorted(judged, key=lambda o: (o.colour, o.shape))
    if describe(judged) != describe(truth):
        return False
    return all(max(abs(a - b) for a, b in zip(o.box, j.box)) <= tol for o, j in zip(truth, judged))


def degrade(image: Image.Image, rng: np.random.Generator, std: float = 20.0) -> Image.Image:
    # Blur first, then noise: the noise then stays at full strength instead of being smoothed away.
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float32)
    noisy = blurred + rng.normal(0.0, std, blurred.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))


def test_every_shape_and_side_is_read_back_exactly():
    for shape in shapes.SHAPES:
        for side in SIDES:
            size = "small" if side <= 16 else "large"
            obj = shapes.Obj(shape, "purple", size, (3, 5, 3 + side, 5 + side))
            (found,) = judge(shapes.render([obj]))
            assert (found.size, found.colour, found.shape, found.box) == (size, "purple", shape, obj.box)


def test_clean_renders_agree_with_ground_truth(scenes):
    # Measured: 300/300 (and 1000/1000 on another sample) with exact boxes, so no slack is given.
    wrong = [s.caption() for s in scenes if not judged_right(s, judge(s.image()), tol=0)]
    assert wrong == []
    # Exact boxes give exact centres, so the judge's order is the caption's order.
    assert all(describe(judge(s.image())) == describe(s.ordered()) for s in scenes[:50])


def test_noisy_blurry_renders_are_still_judged_right(scenes):
    # Measured 300/300 here and 99.9% over 6000 other scenes. Blur eats the one-pixel apex of a
    # triangle, moving its top edge down by up to 2 px, hence tol=2 (with tol=1: 99.0-99.4%).
    rng = np.random.default_rng(7)
    rate = np.mean([judged_right(s, judge(degrade(s.image(), rng)), tol=2) for s in scenes])
    assert rate >= 0.99


def test_blank_and_speckled_images_have_no_objects():
    white = Image.new("RGB", (64, 64), "white")
    assert judge(white) == []
    rng = np.random.default_rng(0)
    speckle = np.full((64, 64, 3), 255, dtype=np.uint8)
    ys, xs = rng.integers(0, 64, size=(2, 40))
    speckle[ys, xs] = shapes.COLOURS["red"]  # isolated pixels, far below an object's area
    assert judge(speckle) == []


def test_other_sizes_and_array_input(scenes):
    scene = scenes[0]
    image = scene.image()
    expected = describe(judge(image))
    assert describe(judge(image.resize((256, 256), Image.Resampling.NEAREST))) == expected
    assert describe(judge(np.asarray(image))) == expected
    assert describe(judge(image.convert("RGBA"))) == expected


def test_captions_round_trip_to_scene_objects(scenes):
    for scene in scenes:
        assert objects_in_caption(scene.caption()) == describe(scene.ordered())
    rng = np.random.default_rng(3)
    for _ in range(20):
        clip = shapes.sample_video(rng)
        assert objects_in_caption(clip.caption()) == describe([clip.objects[clip.mover]])
    assert objects_in_caption("A large red circle above a small gray diamond.") == [
        ("large", "red", "circle"), ("small", "gray", "diamond")]
    assert objects_in_caption("a big red circle") == []


def test_score_prompt_on_own_render_is_all_right(scenes):
    for scene in scenes[:50]:
        score = score_prompt(scene.image(), objects_in_caption(scene.caption()))
        assert score["all_objects_right"] and score["exact"]
        assert score["colour_shape_rate"] == score["size_rate"] == 1.0
        assert score["extra"] == 0
        assert [p["box"] for p in score["objects"]] == [o.box for o in scene.ordered()]


def test_score_prompt_catches_wrong_colour_size_and_missing_objects():
    red = shapes.Obj("circle", "red", "large", (4, 4, 30, 30))
    blue = shapes.Obj("square", "blue", "small", (40, 40, 52, 52))
    image = shapes.render([red, blue])

    wrong_colour = score_prompt(image, [("large", "green", "circle"), ("small", "blue", "square")])
    assert not wrong_colour["all_objects_right"] and not wrong_colour["exact"]
    assert [p["colour_shape"] for p in wrong_colour["objects"]] == [False, True]
    assert wrong_colour["colour_shape_rate"] == 0.5 and wrong_colour["extra"] == 1

    wrong_size = score_prompt(image, [("small", "red", "circle")])
    assert wrong_size["all_objects_right"] and not wrong_size["exact"]
    assert wrong_size["objects"][0]["size"] is False and wrong_size["extra"] == 1

    # Matching is one-to-one: one drawn red circle cannot satisfy two wanted ones.
    twice = score_prompt(image, [("large", "red", "circle"), ("large", "red", "circle")])
    assert [p["colour_shape"] for p in twice["objects"]] == [True, False]
    assert not twice["all_objects_right"]

    blank = score_prompt(Image.new("RGB", (64, 64), "white"), [("large", "red", "circle")])
    assert not blank["all_objects_right"] and blank["judged"] == []


def test_score_prompt_prefers_the_object_of_the_right_size():
    # Off-spec (a scene never repeats colour+shape) but a generator may draw it: the small wanted
    # circle must take the small drawn one even though the large one comes first.
    big = shapes.Obj("circle", "red", "large", (2, 2, 30, 30))
    small = shapes.Obj("circle", "red", "small", (40, 40, 52, 52))
    wanted = [("small", "red", "circle"), ("large", "red", "circle")]
    score = score_prompt(shapes.render([big, small]), wanted)
    assert score["exact"] and [p["box"] for p in score["objects"]] == [small.box, big.box]

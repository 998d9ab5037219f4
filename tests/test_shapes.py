"""Shapes World v1 must follow shared/shapes-world.md exactly: these tests check the generator
against the spec, mostly by re-deriving what the spec says from the objects and the pixels."""

from __future__ import annotations

import json
import re
from collections import Counter
from itertools import combinations

import numpy as np
import pytest

from nextmm.data.sample import Image, Text, Video
from nextmm.worlds.shapes import generator as S
from nextmm.worlds.shapes.generator import COLOURS, SHAPES, SIZES, Obj, Scene, VideoClip

WHITE = (255, 255, 255)
RGB_TO_NAME = {rgb: name for name, rgb in COLOURS.items()}


def pixels(img) -> np.ndarray:
    return np.asarray(img)


def colours_in(img) -> set[tuple[int, int, int]]:
    a = pixels(img).reshape(-1, 3).astype(np.int32)
    packed = np.unique((a[:, 0] << 16) | (a[:, 1] << 8) | a[:, 2])
    return {(int(v) >> 16, (int(v) >> 8) & 255, int(v) & 255) for v in packed}


def mask_of(img, rgb) -> np.ndarray:
    return (pixels(img) == np.array(rgb, dtype=np.uint8)).all(-1)


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def identify(img) -> tuple[str, str, tuple[int, int, int, int]]:
    """(shape, colour, box) of the single object in a one-object image, read from the pixels."""
    (rgb,) = colours_in(img) - {WHITE}
    colour = RGB_TO_NAME[rgb]
    box = bbox(mask_of(img, rgb))
    matches = [s for s in SHAPES if np.array_equal(pixels(S.render([Obj(s, colour, "small", box)])), pixels(img))]
    assert len(matches) == 1, matches
    return matches[0], colour, box


def apart(a, b, gap=2) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def on_canvas(box) -> bool:
    return 0 <= box[0] and 0 <= box[1] and box[2] <= 64 and box[3] <= 64


def check_objects(objects: list[Obj]) -> None:
    for o in objects:
        assert o.shape in SHAPES and o.colour in COLOURS and o.size in SIZES
        x0, y0, x1, y1 = o.box
        lo, hi = SIZES[o.size]
        assert x1 - x0 == y1 - y0 and lo <= x1 - x0 <= hi, o
        assert on_canvas(o.box), o
        assert all(isinstance(v, int) for v in o.box)
    for a, b in combinations(objects, 2):
        assert apart(a.box, b.box), (a, b)
    assert len({(o.colour, o.shape) for o in objects}) == len(objects)


def texts(sample) -> list[str]:
    return [s.text for s in sample.segments if isinstance(s, Text)]


def image_bytes(sample) -> list[bytes]:
    return [im.tobytes() for im in sample.images()]


def objs(meta_list) -> list[Obj]:
    return [Obj.from_dict(d) for d in meta_list]


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("kind", S.KINDS)
def test_samples_are_deterministic_per_seed_and_index(kind):
    a = list(S.make_samples(kind, 7, 4))
    b = list(S.make_samples(kind, 7, 4))
    assert [s.key for s in a] == [s.key for s in b]
    assert [texts(s) for s in a] == [texts(s) for s in b]
    assert [image_bytes(s) for s in a] == [image_bytes(s) for s in b]
    assert [s.meta for s in a] == [s.meta for s in b]
    # Each index is reproducible on its own, without generating the ones before it.
    alone = list(S.make_samples(kind, 7, 1, start=3))
    same = [s for s in a if s.key.startswith(f"{kind}-7-0000003")]
    assert [texts(s) for s in alone] == [texts(s) for s in same]
    assert [image_bytes(s) for s in alone] == [image_bytes(s) for s in same]
    c = list(S.make_samples(kind, 8, 4))
    assert [image_bytes(s) for s in a] != [image_bytes(s) for s in c]
    for s in a:
        assert s.kind == kind
        assert re.fullmatch(rf"{kind}-7-\d{{7}}(-\d+)?", s.key)
        json.dumps(s.meta)  # meta goes into JSON shards


def test_kinds_draw_from_separate_streams():
    cap = [s.meta["objects"] for s in S.make_samples("caption", 0, 20)]
    ground = {}
    for s in S.make_samples("ground", 0, 20):
        ground[s.key.rsplit("-", 1)[0].replace("ground", "caption")] = s.meta["objects"]
    same = sum(m == ground.get(f"caption-0-{i:07d}") for i, m in enumerate(cap))
    assert same < 5


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError):
        list(S.make_samples("nonsense", 0, 1))


# ----------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", [10, 13, 16, 22, 27, 30])
def test_each_shape_is_solid_and_fills_its_box_extent(shape, side):
    for colour, rgb in COLOURS.items():
        box = (5, 9, 5 + side, 9 + side)
        img = S.render([Obj(shape, colour, "small", box)])
        assert img.size == (64, 64) and img.mode == "RGB"
        assert colours_in(img) == {WHITE, rgb}  # no anti-aliasing, exact colour
        m = mask_of(img, rgb)
        # Every pixel inside the box (x1/y1 exclusive), and the shape reaches all four sides.
        assert bbox(m) == box
        if shape == "square":
            expected = np.zeros((64, 64), bool)
            expected[9 : 9 + side, 5 : 5 + side] = True
            assert np.array_equal(m, expected)
        else:
            assert m.sum() < side * side


def test_shapes_look_different_and_triangle_points_up():
    box = (0, 0, 30, 30)
    masks = {s: mask_of(S.render([Obj(s, "red", "large", box)]), COLOURS["red"]) for s in SHAPES}
    assert len({m.tobytes() for m in masks.values()}) == 4
    tri = masks["triangle"]
    assert tri[29].sum() == 30 and tri[0].sum() <= 2  # wide base at the bottom, apex on top
    dia = masks["diamond"]
    assert dia[0].sum() <= 2 and dia[29].sum() <= 2 and dia[:, 0].sum() <= 2
    circle = masks["circle"]
    assert not circle[0, 0] and circle[15, 15] and abs(circle.sum() - np.pi * 15**2) < 40


def test_scene_images_hold_only_background_and_object_colours():
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = S.sample_scene(rng)
        img = scene.image()
        assert img.size == (64, 64)
        assert colours_in(img) == {WHITE} | {COLOURS[o.colour] for o in scene.objects}
        for colour in {o.colour for o in scene.objects}:
            mine = [o for o in scene.objects if o.colour == colour]
            inside = np.zeros((64, 64), bool)
            for o in mine:
                x0, y0, x1, y1 = o.box
                inside[y0:y1, x0:x1] = True
            m = mask_of(img, COLOURS[colour])
            assert not (m & ~inside).any()  # each colour stays within its objects' boxes
            if len(mine) == 1:
                assert bbox(m) == mine[0].box


# ----------------------------------------------------------------------------- scenes


def test_scene_constraints_hold_over_many_samples():
    rng = np.random.default_rng(2)
    counts, sizes = Counter(), Counter()
    for _ in range(2000):
        scene = S.sample_scene(rng)
        assert 1 <= len(scene.objects) <= 3
        check_objects(scene.objects)
        counts[len(scene.objects)] += 1
        sizes.update(o.size for o in scene.objects)
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 500
    assert sizes["small"] > 0.4 * sum(sizes.values()) and sizes["large"] > 0.4 * sum(sizes.values())


def test_sample_scene_honours_n_objects():
    rng = np.random.default_rng(3)
    for n in (1, 2, 3):
        for _ in range(100):
            scene = S.sample_scene(rng, n)
            assert len(scene.objects) == n
            check_objects(scene.objects)
    with pytest.raises(ValueError):
        S.sample_scene(rng, 4)


# ----------------------------------------------------------------------------- captions


def O(shape, colour, size, box):
    return Obj(shape, colour, size, box)


@pytest.mark.parametrize(
    "objects, caption",
    [
        ([O("circle", "red", "large", (0, 0, 24, 24))], "a large red circle"),
        # Left of: given right-to-left, ordered by centre x.
        (
            [O("square", "blue", "small", (30, 5, 40, 15)), O("circle", "red", "small", (0, 0, 10, 10))],
            "a small red circle to the left of a small blue square",
        ),
        # Above: dx = 2 < |dy| = 30 and A (left) is higher.
        (
            [O("triangle", "green", "small", (12, 30, 22, 40)), O("diamond", "gray", "small", (10, 0, 20, 10))],
            "a small gray diamond above a small green triangle",
        ),
        # Below: dx = 3 < dy = 38, A (left) is lower.
        (
            [O("circle", "cyan", "small", (3, 2, 13, 12)), O("square", "purple", "small", (0, 40, 10, 50))],
            "a small purple square below a small cyan circle",
        ),
        # Ties dx == |dy| read "to the left of", whichever the sign of dy.
        (
            [O("circle", "red", "small", (20, 20, 30, 30)), O("circle", "blue", "small", (0, 0, 10, 10))],
            "a small blue circle to the left of a small red circle",
        ),
        (
            [O("circle", "red", "small", (20, 0, 30, 10)), O("circle", "blue", "small", (0, 20, 10, 30))],
            "a small blue circle to the left of a small red circle",
        ),
        # Centres differ in size, not in x: dx = 0 so it is vertical.
        (
            [O("square", "orange", "large", (0, 30, 30, 60)), O("circle", "yellow", "small", (10, 2, 20, 12))],
            "a small yellow circle above a large orange square",
        ),
        (
            [
                O("diamond", "blue", "large", (34, 34, 64, 64)),
                O("circle", "red", "small", (0, 0, 10, 10)),
                O("triangle", "gray", "small", (20, 0, 32, 12)),
            ],
            "a small red circle, a small gray triangle and a large blue diamond",
        ),
    ],
)
def test_caption_grammar(objects, caption):
    assert Scene(objects).caption() == caption


def test_caption_centre_x_tie_is_independent_of_input_order():
    top, bottom = O("circle", "red", "small", (0, 0, 10, 10)), O("square", "blue", "small", (0, 20, 10, 30))
    assert Scene([top, bottom]).caption() == Scene([bottom, top]).caption() == (
        "a small red circle above a small blue square"
    )


def test_caption_for_sampled_scenes_lists_every_object_once():
    rng = np.random.default_rng(4)
    for _ in range(300):
        scene = S.sample_scene(rng)
        cap = scene.caption()
        assert cap == cap.lower() and not cap.endswith(".")
        for o in scene.objects:
            assert cap.count(o.phrase) == 1


# ----------------------------------------------------------------------------- questions and grounding


def test_questions_for_a_hand_built_scene():
    scene = Scene(
        [
            O("circle", "red", "small", (0, 0, 10, 10)),
            O("circle", "blue", "large", (20, 0, 44, 24)),
            O("square", "blue", "small", (0, 40, 12, 52)),
        ]
    )
    qs = scene.questions(np.random.default_rng(0))
    fixed = [q for q in qs if q[0] != "exists"]
    assert sorted(fixed) == sorted(
        [
            ("color", "what color is the square?", "blue"),  # two circles: no colour question for them
            ("shape", "what shape is the red object?", "circle"),  # two blue objects: none for blue
            ("size", "what size is the red circle?", "small"),
            ("size", "what size is the blue circle?", "large"),
            ("size", "what size is the blue square?", "small"),
            ("count", "how many objects are there?", "three"),
            ("count_shape", "how many circles are there?", "two"),
            ("count_shape", "how many squares are there?", "one"),
            ("count_shape", "how many triangles are there?", "zero"),
            ("count_shape", "how many diamonds are there?", "zero"),
        ]
    )
    exists = [q for q in qs if q[0] == "exists"]
    assert len(exists) == 1


def expected_questions(objects: list[Obj]) -> set[tuple[str, str, str]]:
    """The spec's table, written independently of the generator."""
    out = set()
    for o in objects:
        if sum(p.shape == o.shape for p in objects) == 1:
            out.add(("color", f"what color is the {o.shape}?", o.colour))
        if sum(p.colour == o.colour for p in objects) == 1:
            out.add(("shape", f"what shape is the {o.colour} object?", o.shape))
        out.add(("size", f"what size is the {o.colour} {o.shape}?", o.size))
    words = ["zero", "one", "two", "three"]
    out.add(("count", "how many objects are there?", words[len(objects)]))
    for s in SHAPES:
        out.add(("count_shape", f"how many {s}s are there?", words[sum(o.shape == s for o in objects)]))
    return out


def test_questions_match_the_spec_table_and_exists_is_balanced():
    rng = np.random.default_rng(5)
    answers = Counter()
    for _ in range(4000):
        scene = S.sample_scene(rng)
        qs = scene.questions(rng)
        assert len(qs) == len(set(qs))
        assert {q for q in qs if q[0] != "exists"} == expected_questions(scene.objects)
        (ex,) = [q for q in qs if q[0] == "exists"]
        colour, shape = re.fullmatch(r"is there a (\w+) (\w+)\?", ex[1]).groups()
        assert colour in COLOURS and shape in SHAPES
        present = any(o.colour == colour and o.shape == shape for o in scene.objects)
        assert ex[2] == ("yes" if present else "no")
        answers[ex[2]] += 1
        for _, _, a in qs:
            assert re.fullmatch(r"[a-z]+", a)  # single-word answers
    assert 0.45 < answers["yes"] / 4000 < 0.55


def test_grounding_names_each_object_with_its_box():
    rng = np.random.default_rng(6)
    for _ in range(200):
        scene = S.sample_scene(rng)
        assert sorted(scene.grounding()) == sorted((o.phrase, o.box) for o in scene.objects)
    twins = Scene([O("circle", "red", "small", (0, 0, 10, 10)), O("circle", "red", "small", (20, 0, 30, 10))])
    assert twins.grounding() == []  # not a legal scene, but a shared phrase must never be grounded


def test_vqa_and_ground_samples():
    for s in S.make_samples("vqa", 11, 30):
        scene_objs = objs(s.meta["objects"])
        if s.meta["template"] != "exists":  # exists is checked against the scene above
            assert (s.meta["template"], s.meta["question"], s.meta["answer"]) in expected_questions(scene_objs)
        assert [type(x) for x in s.segments] == [Image, Text, Text]
        assert s.segments[1].text == f"question: {s.meta['question']} answer:" and not s.segments[1].target
        assert s.segments[2].text == s.meta["answer"] and s.segments[2].target
        assert s.segments[0].image.tobytes() == S.render(scene_objs).tobytes()
    ground = list(S.make_samples("ground", 11, 30))
    per_scene = Counter(s.key.rsplit("-", 1)[0] for s in ground)
    assert len(per_scene) == 30
    for s in ground:
        assert per_scene[s.key.rsplit("-", 1)[0]] == len(s.meta["objects"])  # one per object
        assert [type(x) for x in s.segments] == [Image, Text, Text]
        assert s.segments[1].text == f'which region does the text "{s.meta["phrase"]}" describe?'
        assert not s.segments[1].target and s.segments[2].target
        (o,) = [o for o in objs(s.meta["objects"]) if o.phrase == s.meta["phrase"]]
        assert s.meta["box"] == list(o.box)
        assert s.segments[2].text == "<loc>" + " ".join(f"{v / 64:.4f}" for v in o.box) + "</loc>"


def test_instruction_kinds():
    itm = list(S.make_samples("itm", 3, 200))
    assert 0.4 < np.mean([s.meta["answer"] == "yes" for s in itm]) < 0.6
    for s in itm:
        scene = S.Scene(objs(s.meta["objects"]))
        caption, answer = s.meta["caption"], s.segments[2].text
        assert s.segments[1].text == f'does the text "{caption}" match the image?' and answer == s.meta["answer"]
        if answer == "yes":
            assert caption == scene.caption()
        else:  # one word differs: a colour or a shape
            differ = [(a, b) for a, b in zip(caption.split(), scene.caption().split()) if a != b]
            assert len(caption.split()) == len(scene.caption().split()) and len(differ) == 1
            assert differ[0][0].rstrip(",") in list(S.COLOURS) + list(S.SHAPES)
    for s in S.make_samples("region_caption", 3, 30):
        (o,) = [o for o in objs(s.meta["objects"]) if list(o.box) == s.meta["box"]]
        assert s.segments[2].text == o.phrase and f"<loc>{o.box[0] / 64:.4f} " in s.segments[1].text
    for s in S.make_samples("detect", 3, 30):
        scene = S.Scene(objs(s.meta["objects"]))
        listed = s.segments[2].text.split(", ")
        assert [item.split(" <loc>")[0] for item in listed] == [o.phrase for o in scene.ordered()]


# ----------------------------------------------------------------------------- videos


def test_videos_follow_the_spec():
    rng = np.random.default_rng(7)
    seen = Counter()
    for _ in range(300):
        clip = S.sample_video(rng)
        assert 1 <= len(clip.objects) <= 2 and 0 <= clip.mover < len(clip.objects)
        assert clip.direction in S.DIRECTIONS and clip.speed in (2, 3, 4)
        check_objects(clip.objects)
        frames = clip.frames()
        assert len(frames) == 8
        ux, uy = S.DIRECTIONS[clip.direction]
        m0 = clip.objects[clip.mover]
        for t, frame in enumerate(frames):
            at = clip.objects_at(t)
            check_objects(at)  # on canvas, apart with the 2 px gap, in every frame
            for i, o in enumerate(at):
                d = t * clip.speed if i == clip.mover else 0
                start = clip.objects[i]
                x0, y0, x1, y1 = start.box
                assert o == Obj(start.shape, start.colour, start.size, (x0 + ux * d, y0 + uy * d, x1 + ux * d, y1 + uy * d))
            assert frame.size == (64, 64)
            assert frame.tobytes() == S.render(at).tobytes()
            # Read the mover's position back from the pixels when its colour is its own.
            if all(o.colour != m0.colour for i, o in enumerate(at) if i != clip.mover):
                assert bbox(mask_of(frame, COLOURS[m0.colour])) == at[clip.mover].box
        assert clip.caption() == f"{m0.phrase} moves {clip.direction}"
        assert clip.questions() == [
            ("direction", f"which direction does the {m0.colour} {m0.shape} move?", clip.direction),
            ("moving_color", "what color is the moving object?", m0.colour),
            ("moving_shape", "what shape is the moving object?", m0.shape),
        ]
        seen[clip.direction] += 1
        seen[len(clip.objects)] += 1
        seen[("speed", clip.speed)] += 1
        seen[("mover", clip.mover)] += 1
    assert all(seen[d] > 30 for d in S.DIRECTIONS)
    assert seen[1] > 50 and seen[2] > 50 and all(seen[("speed", v)] > 50 for v in (2, 3, 4))
    assert seen[("mover", 1)] > 20


def test_video_samples():
    (cap,) = list(S.make_samples("video_caption", 3, 1))
    assert [type(x) for x in cap.segments] == [Video, Text] and len(cap.segments[0].frames) == 8
    clip = VideoClip(objs(cap.meta["objects"]), cap.meta["mover"], cap.meta["direction"], cap.meta["speed"])
    assert cap.segments[1].text == clip.caption()
    qa = list(S.make_samples("video_qa", 3, 1))
    assert [s.meta["template"] for s in qa] == ["direction", "moving_color", "moving_shape"]
    assert [s.key for s in qa] == [f"video_qa-3-0000000-{q}" for q in range(3)]


# ----------------------------------------------------------------------------- documents


def test_story_documents():
    orders = Counter()
    for s in S.make_samples("story", 1, 200):
        scenes = s.meta["scenes"]
        assert 2 <= len(scenes) <= 4 and len(s.segments) == 2 * len(scenes)
        for i, scene_meta in enumerate(scenes):
            pair = s.segments[2 * i : 2 * i + 2]
            kinds = tuple(type(x) for x in pair)
            assert kinds in [(Image, Text), (Text, Image)]
            orders[kinds] += 1
            image = next(x for x in pair if isinstance(x, Image)).image
            text = next(x for x in pair if isinstance(x, Text))
            scene = Scene(objs(scene_meta))
            check_objects(scene.objects)
            assert text.target and text.text == scene.caption()
            assert image.tobytes() == scene.image().tobytes()
    assert min(orders.values()) > 150


def test_edit_documents_do_what_they_say():
    ops = Counter()
    for s in S.make_samples("edit", 2, 400):
        assert [type(x) for x in s.segments] == [Image, Text, Image]
        before, after = objs(s.meta["before"]), objs(s.meta["after"])
        check_objects(before)
        check_objects(after)
        assert s.segments[0].image.tobytes() == S.render(before).tobytes()
        assert s.segments[2].image.tobytes() == S.render(after).tobytes()
        text = s.segments[1].text
        assert s.segments[1].target and text == s.meta["instruction"]
        if m := re.fullmatch(r"make the (\w+) (\w+) (\w+)", text):
            colour, shape, colour2 = m.groups()
            assert colour2 in COLOURS and colour2 != colour
            (i,) = [i for i, o in enumerate(before) if (o.colour, o.shape) == (colour, shape)]
            assert after[:i] + after[i + 1 :] == before[:i] + before[i + 1 :]
            assert after[i] == Obj(shape, colour2, before[i].size, before[i].box)
            ops["recolour"] += 1
        elif m := re.fullmatch(r"remove the (\w+) (\w+)", text):
            (i,) = [i for i, o in enumerate(before) if (o.colour, o.shape) == m.groups()]
            assert len(before) >= 2 and after == before[:i] + before[i + 1 :]
            ops["remove"] += 1
        elif m := re.fullmatch(r"add (a (small|large) (\w+) (\w+))", text):
            assert len(before) < 3 and after[:-1] == before and after[-1].phrase == m.group(1)
            ops["add"] += 1
        else:
            pytest.fail(f"bad instruction {text!r}")
        assert s.meta["op"] in ops
    assert set(ops) == {"recolour", "remove", "add"} and min(ops.values()) > 50


WORD = re.compile(r"(?:%s){2,3}" % "|".join(S.SYLLABLES))


def check_binding_pairs(segments, bindings, target):
    """Every (image, "this is a {word}") pair shows an object with the word's bound attribute and
    none of the other words' attributes. Returns the words shown."""
    shown = []
    for img_seg, txt in zip(segments[::2], segments[1::2]):
        assert isinstance(img_seg, Image) and isinstance(txt, Text) and txt.target == target
        word = re.fullmatch(r"this is a (\w+)", txt.text).group(1)
        shape, colour, _ = identify(img_seg.image)
        attrs = {"shape": shape, "colour": colour}
        matching = [w for w, b in bindings.items() if attrs[b["attribute"]] == b["value"]]
        assert matching == [word]
        shown.append(word)
    return shown


def test_binding_documents():
    word_sets = set()
    for s in S.make_samples("binding", 4, 200):
        bindings = s.meta["bindings"]
        assert 2 <= len(bindings) <= 4
        for w in bindings:
            assert WORD.fullmatch(w), w
        targets = [(b["attribute"], b["value"]) for b in bindings.values()]
        assert len(set(targets)) == len(targets)
        for a, v in targets:
            assert v in (SHAPES if a == "shape" else COLOURS)
        assert 3 <= len(s.segments) // 2 <= 6 and len(s.segments) % 2 == 0
        shown = check_binding_pairs(s.segments, bindings, target=True)
        assert set(shown) == set(bindings)  # every word is taught at least once
        assert [identify(im)[:2] for im in s.images()] == [(o.shape, o.colour) for o in objs(s.meta["objects"])]
        word_sets.add(frozenset(bindings))
    assert len(word_sets) > 190  # new words for each document


@pytest.mark.parametrize("shots", [1, 2, 3, 4, 6, 8])
def test_binding_fewshot_prompt(shots):
    for seed in range(40):
        segments, answer = S.binding_fewshot(np.random.default_rng(seed), shots)
        _, answer2, bindings, query = S._binding_fewshot(np.random.default_rng(seed), shots)
        assert answer == answer2
        meta = {w: {"attribute": a, "value": v} for w, (a, v) in bindings.items()}
        assert len(segments) == 2 * shots + 2
        assert isinstance(segments[-2], Image)
        assert isinstance(segments[-1], Text) and segments[-1].text == "this is a" and not segments[-1].target
        shown = check_binding_pairs(segments[:-2], meta, target=False)
        assert answer in shown
        assert S.binding_choices(segments) == list(dict.fromkeys(shown))  # the query's "this is a" adds no word
        if shots >= 2:
            assert len(set(shown)) >= 2
        shape, colour, _ = identify(segments[-2].image)
        assert (shape, colour) == (query.shape, query.colour)
        attr, value = bindings[answer]
        assert {"shape": shape, "colour": colour}[attr] == value
        # The query is consistent with what the shots show for the answer word.
        taught = [identify(seg.image)[:2] for seg, txt in zip(segments[:-2:2], segments[1:-2:2])
                  if txt.text == f"this is a {answer}"]
        assert all(shape == s or colour == c for s, c in taught)
    with pytest.raises(ValueError):
        S.binding_fewshot(np.random.default_rng(0), 0)


def test_named_object_is_the_one_object_a_question_or_a_one_object_caption_names():
    from nextmm.worlds.shapes.generator import CANVAS, named_object

    seen = set()
    for sample in S.make_samples("vqa", 3, 200):
        named = named_object(sample)
        template, question, answer = sample.meta["template"], sample.meta["question"], sample.meta["answer"]
        objects = [Obj.from_dict(o) for o in sample.meta["objects"]]
        if template in ("count", "count_shape") or (template == "exists" and answer == "no"):
            assert named is None
            continue
        segment, box = named
        assert segment == 1 and sample.segments[1].text.endswith("answer:")
        (obj,) = [o for o in objects if tuple(v / CANVAS for v in o.box) == box]
        said = {"color": obj.colour, "shape": obj.shape, "size": obj.size, "exists": "yes"}[template]
        assert answer == said and (obj.colour in question or obj.shape in question)
        seen.add(template)
    assert seen == {"color", "shape", "size", "exists"}
    captions = list(S.make_samples("caption", 3, 40))
    for sample in captions:
        objects = sample.meta["objects"]
        named = named_object(sample)
        assert (named is None) == (len(objects) > 1)
        if named is not None:
            assert named == (1, tuple(v / CANVAS for v in objects[0]["box"]))
    assert any(named_object(s) for s in captions)
    assert all(named_object(s) is None for s in S.make_samples("ground", 3, 5))


@pytest.mark.parametrize("kind", ["vqa", "caption", "region_caption", "ground"])
def test_the_world_writes_what_it_tells_the_pointer_into_its_data(kind, tmp_path):
    """Training reads named boxes and regions from the data (Sample.named_box, Sample.regions), as it would
    from any dataset; Shapes World writes them there, and they survive the shards."""
    from nextmm.data.make import write_shapes
    from nextmm.data.shards import read_shards

    made = list(S.make_samples(kind, 5, 12))
    for sample in made:
        assert sample.named_box() == S.named_object(sample)
        assert sample.regions() == S.object_regions(sample)
    write_shapes(tmp_path, {kind: 12}, seed=5, shard_size=100)
    read = {s.key: s for s in read_shards(tmp_path / kind)}
    assert {s.key: (s.named_box(), s.regions()) for s in made} == {k: (s.named_box(), s.regions()) for k, s in read.items()}
    assert any(s.named_box() or s.regions() for s in made) or kind == "ground"

"""Shapes World v1: the procedural default dataset and benchmark (spec: shared/shapes-world.md).

The spec is a contract shared with any program that makes held-out data, so the wording of
captions, questions and instructions below is copied from it verbatim and must not drift.
Everything is a pure function of a `numpy.random.Generator`; the sample factories seed one
generator per (seed, index, kind) so each sample can be regenerated on its own.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from nextmm.data.sample import (
    Image,
    Sample,
    Segment,
    DETECT_QUESTION,
    Text,
    Video,
    caption_sample,
    conversation_sample,
    grounding_question,
    matching_question,
    video_caption_sample,
    video_qa_sample,
    vqa_sample,
)
from nextmm.tokenizer import loc_text

# ----------------------------------------------------------------------------- the world's vocabulary

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 30),
    "cyan": (40, 190, 200),
    "gray": (120, 120, 120),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": (10, 16), "large": (22, 30)}  # side length in px, inclusive
CANVAS = 64
BACKGROUND = (255, 255, 255)
GAP = 2  # minimum free pixels between two boxes
MAX_OBJECTS = 3
NUMBER_WORDS = ("zero", "one", "two", "three")

N_FRAMES = 8
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEEDS = (2, 3, 4)  # px per frame

# Consonant-vowel syllables: made-up words then start with a consonant, so "this is a {word}" reads
# naturally, and no two- or three-syllable word can collide with the world's English vocabulary.
SYLLABLES = (
    "ba", "be", "bo", "da", "di", "fu", "ga", "ki", "ko", "lu",
    "ma", "mi", "no", "pa", "pi", "ro", "su", "ta", "to", "zu",
)

Box = tuple[int, int, int, int]


# ----------------------------------------------------------------------------- objects and rendering

@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str  # size class, "small" or "large"
    box: Box  # (x0, y0, x1, y1), x1/y1 exclusive

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2, (y0 + y1) / 2)

    def moved(self, dx: int, dy: int) -> "Obj":
        x0, y0, x1, y1 = self.box
        return Obj(self.shape, self.colour, self.size, (x0 + dx, y0 + dy, x1 + dx, y1 + dy))

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "box": list(self.box)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Obj":
        return Obj(d["shape"], d["colour"], d["size"], tuple(int(v) for v in d["box"]))


def render(objects: list[Obj], canvas: int = CANVAS) -> PILImage.Image:
    # ImageDraw on an "RGB" image never anti-aliases, so every pixel is the background or a listed
    # colour. PIL's coordinates are inclusive pixel positions, hence r = x1 - 1 and b = y1 - 1.
    img = PILImage.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        x0, y0, x1, y1 = o.box
        r, b = x1 - 1, y1 - 1
        cx, cy = (x0 + r) / 2, (y0 + b) / 2
        fill = COLOURS[o.colour]
        if o.shape == "square":
            draw.rectangle([x0, y0, r, b], fill=fill)
        elif o.shape == "circle":
            draw.ellipse([x0, y0, r, b], fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(x0, b), (r, b), (cx, y0)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(cx, y0), (r, cy), (cx, b), (x0, cy)], fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
    return img


def _apart(a: Box, b: Box, gap: int = GAP) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


_SIZE_NAMES = tuple(SIZES)
_DIRECTION_NAMES = tuple(DIRECTIONS)
_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)  # fixed order keeps draws reproducible


def _random_side(rng: np.random.Generator) -> tuple[str, int]:
    size = _SIZE_NAMES[int(rng.integers(len(_SIZE_NAMES)))]
    lo, hi = SIZES[size]
    return size, int(rng.integers(lo, hi + 1))


def _free_pairs(objects: list[Obj]) -> list[tuple[str, str]]:
    """(colour, shape) pairs not yet in the scene."""
    used = {(o.colour, o.shape) for o in objects}
    return [p for p in _PAIRS if p not in used]


def _place(rng: np.random.Generator, side: int, others: list[Box], tries: int = 50,
           x_range: tuple[int, int] | None = None, y_range: tuple[int, int] | None = None) -> Box | None:
    """A random on-canvas box of this side, at least GAP px from every box in `others`, or None."""
    xlo, xhi = x_range or (0, CANVAS - side)
    ylo, yhi = y_range or (0, CANVAS - side)
    # One vectorised draw for all tries: numpy's per-call overhead dominates otherwise.
    xs = rng.integers(xlo, xhi + 1, size=tries).tolist()
    ys = rng.integers(ylo, yhi + 1, size=tries).tolist()
    for x0, y0 in zip(xs, ys):
        box = (x0, y0, x0 + side, y0 + side)
        if all(_apart(box, o) for o in others):
            return box
    return None


# ----------------------------------------------------------------------------- scenes

@dataclass
class Scene:
    objects: list[Obj]

    def image(self) -> PILImage.Image:
        return render(self.objects)

    def ordered(self) -> list[Obj]:
        # The spec orders by centre x only; ties (one object straight above another) are broken by
        # centre y so the caption is still a function of the scene, reading "A above B".
        return sorted(self.objects, key=lambda o: (o.centre[0], o.centre[1]))

    def caption(self) -> str:
        objs = self.ordered()
        if len(objs) == 1:
            return objs[0].phrase
        if len(objs) == 2:
            a, b = objs
            dx = abs(a.centre[0] - b.centre[0])
            dy = a.centre[1] - b.centre[1]
            if dx >= abs(dy):
                return f"{a.phrase} to the left of {b.phrase}"
            return f"{a.phrase} above {b.phrase}" if dy < 0 else f"{a.phrase} below {b.phrase}"
        if len(objs) == 3:
            a, b, c = objs
            return f"{a.phrase}, {b.phrase} and {c.phrase}"
        raise ValueError(f"a scene has 1 to {MAX_OBJECTS} objects, got {len(objs)}")

    def questions(self, rng: np.random.Generator) -> list[tuple[str, str, str]]:
        """(template id, question, answer) for every instance of every template the spec allows."""
        objs = self.objects
        shapes = Counter(o.shape for o in objs)
        colours = Counter(o.colour for o in objs)
        out: list[tuple[str, str, str]] = []
        # "the {shape}" / "the {colour} object" are only well-defined when they pick one object.
        for o in objs:
            if shapes[o.shape] == 1:
                out.append(("color", f"what color is the {o.shape}?", o.colour))
        for o in objs:
            if colours[o.colour] == 1:
                out.append(("shape", f"what shape is the {o.colour} object?", o.shape))
        for o in objs:
            out.append(("size", f"what size is the {o.colour} {o.shape}?", o.size))
        out.append(("count", "how many objects are there?", NUMBER_WORDS[len(objs)]))
        for s in SHAPES:
            out.append(("count_shape", f"how many {s}s are there?", NUMBER_WORDS[shapes[s]]))
        # One existence question per scene, its answer a fair coin so "yes" is never a prior to learn.
        if rng.random() < 0.5:
            o = objs[int(rng.integers(len(objs)))]
            colour, shape, answer = o.colour, o.shape, "yes"
        else:
            free = _free_pairs(objs)
            colour, shape = free[int(rng.integers(len(free)))]
            answer = "no"
        out.append(("exists", f"is there a {colour} {shape}?", answer))
        return out

    def grounding(self) -> list[tuple[str, Box]]:
        phrases = Counter(o.phrase for o in self.objects)
        return [(o.phrase, o.box) for o in self.objects if phrases[o.phrase] == 1]


def _new_object(rng: np.random.Generator, objects: list[Obj], avoid: list[Box] | None = None,
                tries: int = 50) -> Obj | None:
    """A random object with a colour+shape not in `objects`, placed clear of their boxes (or of
    `avoid`, when given), or None when no place was found."""
    free = _free_pairs(objects)
    colour, shape = free[int(rng.integers(len(free)))]
    size, side = _random_side(rng)
    box = _place(rng, side, [o.box for o in objects] if avoid is None else avoid, tries)
    return None if box is None else Obj(shape, colour, size, box)


def sample_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be 1..{MAX_OBJECTS}, got {n}")
    while True:  # early placements can leave no room for the last object: start the scene over
        objects: list[Obj] = []
        for _ in range(n):
            o = _new_object(rng, objects)
            if o is None:
                break
            objects.append(o)
        if len(objects) == n:
            return Scene(objects)


# ----------------------------------------------------------------------------- videos

@dataclass
class VideoClip:
    objects: list[Obj]  # as in frame 0
    mover: int  # index into objects
    direction: str
    speed: int  # px per frame

    def objects_at(self, t: int) -> list[Obj]:
        ux, uy = DIRECTIONS[self.direction]
        return [o.moved(ux * self.speed * t, uy * self.speed * t) if i == self.mover else o
                for i, o in enumerate(self.objects)]

    def frames(self) -> list[PILImage.Image]:
        return [render(self.objects_at(t)) for t in range(N_FRAMES)]

    def caption(self) -> str:
        return f"{self.objects[self.mover].phrase} moves {self.direction}"

    def questions(self) -> list[tuple[str, str, str]]:
        m = self.objects[self.mover]
        return [
            ("direction", f"which direction does the {m.colour} {m.shape} move?", self.direction),
            ("moving_color", "what color is the moving object?", m.colour),
            ("moving_shape", "what shape is the moving object?", m.shape),
        ]


def sample_video(rng: np.random.Generator) -> VideoClip:
    n = int(rng.integers(1, 3))
    travel = N_FRAMES - 1
    while True:
        direction = _DIRECTION_NAMES[int(rng.integers(len(_DIRECTION_NAMES)))]
        speed = SPEEDS[int(rng.integers(len(SPEEDS)))]
        colour, shape = _PAIRS[int(rng.integers(len(_PAIRS)))]
        size, side = _random_side(rng)
        # Restrict the start so the last frame is still on the canvas; the rest follow (straight line).
        ux, uy = DIRECTIONS[direction]
        reach = travel * speed
        x_range = (max(0, -ux * reach), CANVAS - side - max(0, ux * reach))
        y_range = (max(0, -uy * reach), CANVAS - side - max(0, uy * reach))
        mover = Obj(shape, colour, size, _place(rng, side, [], tries=1, x_range=x_range, y_range=y_range))
        objects = [mover]
        if n == 2:
            # The still object must clear the mover in every frame, not just in frame 0.
            path = [mover.moved(ux * speed * t, uy * speed * t).box for t in range(N_FRAMES)]
            other = _new_object(rng, [mover], avoid=path, tries=100)
            if other is None:
                continue
            objects.append(other)
        index = int(rng.integers(n))
        objects.insert(index, objects.pop(0))  # the mover need not come first
        return VideoClip(objects, index, direction, speed)


# ----------------------------------------------------------------------------- interleaved documents

def _objects_meta(objects: list[Obj]) -> list[dict[str, Any]]:
    return [o.to_dict() for o in objects]


def story_doc(rng: np.random.Generator, key: str = "story") -> Sample:
    n = int(rng.integers(2, 5))
    segments: list[Segment] = []
    scenes = []
    for _ in range(n):
        scene = sample_scene(rng)
        pair: list[Segment] = [Image(scene.image()), Text(scene.caption())]
        if rng.random() < 0.5:  # text before the image, as often as after
            pair.reverse()
        segments += pair
        scenes.append(_objects_meta(scene.objects))
    return Sample(key, "story", segments, {"scenes": scenes})


def _edit(rng: np.random.Generator, before: list[Obj]) -> tuple[str, str, list[Obj]]:
    """(op, instruction, objects after) for one random edit that is legal on this scene."""
    ops = ["recolour"]
    if len(before) >= 2:
        ops.append("remove")
    added = _new_object(rng, before) if len(before) < MAX_OBJECTS else None
    if added is not None:
        ops.append("add")
    op = ops[int(rng.integers(len(ops)))]
    if op == "add":
        return op, f"add {added.phrase}", before + [added]
    # Colour+shape is unique within a scene, so "the {colour} {shape}" names exactly one object.
    i = int(rng.integers(len(before)))
    o = before[i]
    if op == "remove":
        return op, f"remove the {o.colour} {o.shape}", before[:i] + before[i + 1:]
    taken = {(p.colour, p.shape) for p in before}
    colours = [c for c in COLOURS if c != o.colour and (c, o.shape) not in taken]
    colour2 = colours[int(rng.integers(len(colours)))]
    after = list(before)
    after[i] = Obj(o.shape, colour2, o.size, o.box)
    return op, f"make the {o.colour} {o.shape} {colour2}", after


def edit_doc(rng: np.random.Generator, key: str = "edit") -> Sample:
    before = sample_scene(rng).objects
    op, instruction, after = _edit(rng, before)
    segments: list[Segment] = [Image(render(before)), Text(instruction), Image(render(after))]
    meta = {"op": op, "instruction": instruction,
            "before": _objects_meta(before), "after": _objects_meta(after)}
    return Sample(key, "edit", segments, meta)


def _fresh_words(rng: np.random.Generator, n: int) -> list[str]:
    words: list[str] = []
    while len(words) < n:
        k = int(rng.integers(2, 4))
        w = "".join(SYLLABLES[int(i)] for i in rng.integers(len(SYLLABLES), size=k))
        if w not in words:
            words.append(w)
    return words


def _bindings(rng: np.random.Generator, words: list[str]) -> dict[str, tuple[str, str]]:
    """word -> ("shape" | "colour", value), all targets distinct."""
    pools = {"shape": list(SHAPES), "colour": list(COLOURS)}
    out: dict[str, tuple[str, str]] = {}
    for w in words:
        attr = "shape" if rng.random() < 0.5 else "colour"
        if not pools[attr]:  # at most 4 words, so only the 4 shapes can run out
            attr = "colour"
        value = pools[attr].pop(int(rng.integers(len(pools[attr]))))
        out[w] = (attr, value)
    return out


def _object_for(rng: np.random.Generator, word: str, bindings: dict[str, tuple[str, str]]) -> Obj:
    # The free attribute avoids every other word's target, so each image is named by one word only
    # and the in-context mapping is learnable. Always possible: <= 4 words leave a free shape whenever
    # a colour is bound, and at least 4 free colours.
    attr, value = bindings[word]
    other_attr = "colour" if attr == "shape" else "shape"
    bound = {v for a, v in bindings.values() if a == other_attr}
    if attr == "shape":
        shape = value
        free = [c for c in COLOURS if c not in bound]
        colour = free[int(rng.integers(len(free)))]
    else:
        colour = value
        free = [s for s in SHAPES if s not in bound]
        shape = free[int(rng.integers(len(free)))]
    size, side = _random_side(rng)
    return Obj(shape, colour, size, _place(rng, side, [], tries=1))


def _word_sequence(rng: np.random.Generator, n_words: int, n_images: int) -> list[int]:
    """Which word names each image: every word at least once when there are enough images."""
    seq = list(range(min(n_words, n_images)))
    seq += [int(i) for i in rng.integers(n_words, size=n_images - len(seq))]
    return [seq[int(i)] for i in rng.permutation(len(seq))]


def _binding_pairs(rng: np.random.Generator, words: list[str], bindings: dict[str, tuple[str, str]],
                   n_images: int, target: bool) -> tuple[list[Segment], list[Obj]]:
    segments: list[Segment] = []
    objects: list[Obj] = []
    for wi in _word_sequence(rng, len(words), n_images):
        o = _object_for(rng, words[wi], bindings)
        segments += [Image(render([o])), Text(f"this is a {words[wi]}", target=target)]
        objects.append(o)
    return segments, objects


def _bindings_meta(bindings: dict[str, tuple[str, str]]) -> dict[str, dict[str, str]]:
    return {w: {"attribute": a, "value": v} for w, (a, v) in bindings.items()}


def binding_doc(rng: np.random.Generator, key: str = "binding") -> Sample:
    n_words = int(rng.integers(2, 5))
    n_images = int(rng.integers(max(3, n_words), 7))
    words = _fresh_words(rng, n_words)
    bindings = _bindings(rng, words)
    segments, objects = _binding_pairs(rng, words, bindings, n_images, target=True)
    meta = {"bindings": _bindings_meta(bindings), "objects": _objects_meta(objects)}
    return Sample(key, "binding", segments, meta)


def _binding_fewshot(rng: np.random.Generator, shots: int):
    if shots < 1:
        raise ValueError("binding few-shot needs at least one shot to show a word")
    n_words = 1 if shots == 1 else int(rng.integers(2, min(4, shots) + 1))
    words = _fresh_words(rng, n_words)
    bindings = _bindings(rng, words)
    segments, _ = _binding_pairs(rng, words, bindings, shots, target=False)
    answer = words[int(rng.integers(n_words))]
    query = _object_for(rng, answer, bindings)
    segments += [Image(render([query])), Text("this is a", target=False)]
    return segments, answer, bindings, query


def binding_episode(rng: np.random.Generator, pool_size: int) -> tuple[list[tuple[PILImage.Image, str]], tuple[PILImage.Image, str]]:
    """A few-shot episode with a choice of shots (for RICES against random): 2 to 4 fresh words bound as in
    `binding_doc`, `pool_size` one-object images each with the word that names it (every word among
    them when pool_size allows), and a query image with its word."""
    n_words = int(rng.integers(2, 5))
    words = _fresh_words(rng, n_words)
    bindings = _bindings(rng, words)
    segments, _ = _binding_pairs(rng, words, bindings, pool_size, target=False)
    pool = [(img.image, text.text.rsplit(" ", 1)[1]) for img, text in zip(segments[::2], segments[1::2])]
    answer = words[int(rng.integers(n_words))]
    return pool, (render([_object_for(rng, answer, bindings)]), answer)


def binding_fewshot(rng: np.random.Generator, shots: int) -> tuple[list[Segment], str]:
    """The few-shot eval prompt: `shots` (image, "this is a {word}") pairs, a query image and
    "this is a"; returns the segments and the word the model should say next."""
    segments, answer, _, _ = _binding_fewshot(rng, shots)
    return segments, answer


def binding_choices(segments: list[Segment]) -> list[str]:
    """The made-up words a binding prompt's shots show, in order of first showing: the closed set a
    choice among them is scored in (the query's word is missing when no shot shows it)."""
    shown = [s.text.rsplit(" ", 1)[1] for s in segments if isinstance(s, Text) and s.text.startswith("this is a ")]
    return list(dict.fromkeys(shown))


def named_object(sample: Sample) -> tuple[int, tuple[float, ...]] | None:
    """(segment index, box in fractions of the image) of the one object a VQA question or a one-object
    caption names, for pointing at it in training (pretrain.point_at_named); None for any other sample.
    Read off the spec's templates, so shards written before it carry what it needs."""
    objects = [Obj.from_dict(o) for o in sample.meta.get("objects", [])]
    if sample.kind == "caption" and len(objects) == 1 and len(sample.segments) == 2:
        return 1, tuple(v / CANVAS for v in objects[0].box)
    if sample.kind != "vqa" or len(sample.segments) != 3:
        return None
    words = sample.meta.get("question", "").rstrip("?").split()
    template = sample.meta.get("template")
    picks = {
        "color": lambda o: o.shape == words[-1],
        "shape": lambda o: o.colour == words[-2],
        "size": lambda o: (o.colour, o.shape) == tuple(words[-2:]),
        "exists": lambda o: (o.colour, o.shape) == tuple(words[-2:]),
    }
    named = [o for o in objects if template in picks and picks[template](o)]
    return (1, tuple(v / CANVAS for v in named[0].box)) if len(named) == 1 else None


def object_regions(sample: Sample) -> list[tuple[int, str, tuple[float, ...]]]:
    """(image segment index, phrase, box in fractions of the image) for every object of a one-image
    sample's scene whose phrase no other object there shares: region-phrase pairs that train the location
    pointer on every object of every picture (pretrain.point_at_objects), not only on those a text names."""
    pictures = [i for i, seg in enumerate(sample.segments) if isinstance(seg, Image)]
    if len(pictures) != 1:
        return []
    objects = [Obj.from_dict(o) for o in sample.meta.get("objects", [])]
    phrases = Counter(o.phrase for o in objects)
    return [(pictures[0], o.phrase, tuple(v / CANVAS for v in o.box)) for o in objects if phrases[o.phrase] == 1]


# ----------------------------------------------------------------------------- OFA-style instructions
# Tasks as plain instructions (OFA): boxes are written as location text (tokenizer.loc_text), which the
# tokenizer turns into <bin_k> tokens. Grounding follows the spec; the others are nextmm's.


def region_question(box: Box) -> str:
    return f"what does the region {loc_text(box, CANVAS)} show?"


def detection_answer(scene: "Scene") -> str:
    return ", ".join(f"{o.phrase} {loc_text(o.box, CANVAS)}" for o in scene.ordered())


def _mismatched(rng: np.random.Generator, scene: "Scene") -> "Scene":
    """The scene with one object's colour or shape changed (to a pair the scene lacks): a caption of it
    describes the original wrongly in one word."""
    i = int(rng.integers(len(scene.objects)))
    o = scene.objects[i]
    taken = {(p.colour, p.shape) for p in scene.objects}
    if rng.random() < 0.5:
        options = [Obj(o.shape, c, o.size, o.box) for c in COLOURS if (c, o.shape) not in taken]
    else:
        options = [Obj(sh, o.colour, o.size, o.box) for sh in SHAPES if (o.colour, sh) not in taken]
    changed = list(scene.objects)
    changed[i] = options[int(rng.integers(len(options)))]
    return Scene(changed)


def _instruction_sample(kind: str, rng: np.random.Generator, key: str) -> Sample:
    scene = sample_scene(rng)
    image, objects = Image(scene.image()), _objects_meta(scene.objects)
    if kind == "region_caption":
        o = scene.objects[int(rng.integers(len(scene.objects)))]
        return Sample(key, kind, [image, Text(region_question(o.box), target=False), Text(o.phrase)], {"box": list(o.box), "objects": objects})
    if kind == "itm":
        match = bool(rng.random() < 0.5)  # a fair coin, so neither answer is a prior to learn
        caption = (scene if match else _mismatched(rng, scene)).caption()
        answer = "yes" if match else "no"
        return Sample(key, kind, [image, Text(matching_question(caption), target=False), Text(answer)],
                      {"caption": caption, "answer": answer, "objects": objects})
    return Sample(key, kind, [image, Text(DETECT_QUESTION, target=False), Text(detection_answer(scene))], {"objects": objects})


# ----------------------------------------------------------------------------- conversations (instruction tuning)
# The spec's user turns, word for word. A turn's "type" names the one-task kind it asks the same thing as, so a
# conversation's turns are scored as those kinds are (worlds/shapes/conversations.py).

DESCRIBE = "describe the picture."
WHAT_HAPPENS = "what happens in the video?"
MAX_TURNS = 4
# A drawing costs a regressed picture in tuning and a decoder run in evaluation: one turn in five.
DRAW_SHARE = 0.2


def where_question(phrase: str) -> str:
    # The contract's `where is the {object phrase}?` exactly, article and all ("where is the a large red circle?"),
    # so that held-out data from any program that follows it asks what training asked.
    return f"where is the {phrase}?"


def draw_request(caption: str) -> str:
    return f"draw {caption}."


def _picture_turns(rng: np.random.Generator, scene: Scene) -> dict[str, list[dict[str, Any]]]:
    """Every user turn the spec allows about this picture, by type, each {"question", "answer", ...}; the
    draw turns are made apart (each draws a fresh scene)."""
    return {
        "caption": [{"question": DESCRIBE, "answer": scene.caption()}],
        "vqa": [{"question": q, "answer": a, "template": t} for t, q, a in scene.questions(rng)],
        "ground": [{"question": where_question(phrase), "answer": loc_text(box, CANVAS), "box": list(box)}
                   for phrase, box in scene.grounding()],
    }


def _video_turns(clip: VideoClip) -> dict[str, list[dict[str, Any]]]:
    return {
        "video_caption": [{"question": WHAT_HAPPENS, "answer": clip.caption()}],
        "video_qa": [{"question": q, "answer": a, "template": t} for t, q, a in clip.questions()],
    }


def conversation_doc(rng: np.random.Generator, key: str = "conversation") -> Sample:
    """1 to 4 turns about one picture or one video (half each), which comes with the first user turn. A turn
    asks for a drawing of a fresh scene (DRAW_SHARE of them), else a question not yet asked, its type drawn
    evenly among those with one left; meta["turns"] records each turn's type, question and reference answer
    for scoring, and "box" (ground) or "objects" (draw: the scene asked for) where they apply."""
    if rng.random() < 0.5:
        scene = sample_scene(rng)
        visual: Segment = Image(scene.image())
        unasked = _picture_turns(rng, scene)
        meta: dict[str, Any] = {"picture": "image", "objects": _objects_meta(scene.objects)}
    else:
        clip = sample_video(rng)
        visual = Video(clip.frames())
        unasked = _video_turns(clip)
        meta = {"picture": "video", "objects": _objects_meta(clip.objects), "mover": clip.mover,
                "direction": clip.direction, "speed": clip.speed}
    turns: list[tuple[str, list[Segment]]] = []
    records: list[dict[str, Any]] = []
    for k in range(int(rng.integers(1, MAX_TURNS + 1))):
        types = [t for t, left in unasked.items() if left]
        kind = "draw" if rng.random() < DRAW_SHARE or not types else types[int(rng.integers(len(types)))]
        if kind == "draw":
            drawn = sample_scene(rng)
            record = {"type": kind, "question": draw_request(drawn.caption()), "answer": drawn.caption(),
                      "objects": _objects_meta(drawn.objects)}
            answer: list[Segment] = [Image(drawn.image())]
        else:
            record = {"type": kind, **unasked[kind].pop(int(rng.integers(len(unasked[kind]))))}
            answer = [Text(record["answer"])]
        turns += [("user", ([visual] if k == 0 else []) + [Text(record["question"])]), ("assistant", answer)]
        records.append(record)
    sample = conversation_sample(key, turns, **meta)
    sample.meta["turns"] = records  # not as a keyword: conversation_sample's own `turns` are the segments
    return sample


# ----------------------------------------------------------------------------- sample factories

# New kinds go at the end: a kind's stream depends on its place here (KIND_SALT).
KINDS = ("caption", "vqa", "ground", "video_caption", "video_qa", "story", "edit", "binding", "region_caption", "itm", "detect",
         "conversation")
# Third seed word per kind: the kinds of one (seed, index) draw from unrelated streams.
KIND_SALT = {kind: 1000 + i for i, kind in enumerate(KINDS)}


def _rng(kind: str, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, KIND_SALT[kind]])


def _samples_at(kind: str, seed: int, index: int) -> Iterator[Sample]:
    rng = _rng(kind, seed, index)
    key = f"{kind}-{seed}-{index:07d}"
    if kind in ("caption", "vqa", "ground"):
        scene = sample_scene(rng)
        image = scene.image()
        objects = _objects_meta(scene.objects)
        if kind == "caption":
            yield caption_sample(key, image, scene.caption(), objects=objects)
        elif kind == "vqa":
            for q, (template, question, answer) in enumerate(scene.questions(rng)):
                yield vqa_sample(f"{key}-{q}", image, question, answer, template=template, objects=objects)
        else:
            for q, (phrase, box) in enumerate(scene.grounding()):
                prompt = Text(grounding_question(phrase), target=False)
                yield Sample(f"{key}-{q}", "ground", [Image(image), prompt, Text(loc_text(box, CANVAS))],
                             {"phrase": phrase, "box": list(box), "objects": objects})
    elif kind in ("region_caption", "itm", "detect"):
        yield _instruction_sample(kind, rng, key)
    elif kind in ("video_caption", "video_qa"):
        clip = sample_video(rng)
        frames = clip.frames()
        meta = {"objects": _objects_meta(clip.objects), "mover": clip.mover,
                "direction": clip.direction, "speed": clip.speed}
        if kind == "video_caption":
            yield video_caption_sample(key, frames, clip.caption(), **meta)
        else:
            for q, (template, question, answer) in enumerate(clip.questions()):
                yield video_qa_sample(f"{key}-{q}", frames, question, answer, template=template, **meta)
    elif kind == "story":
        yield story_doc(rng, key)
    elif kind == "edit":
        yield edit_doc(rng, key)
    elif kind == "binding":
        yield binding_doc(rng, key)
    elif kind == "conversation":
        yield conversation_doc(rng, key)
    else:
        raise ValueError(f"unknown Shapes World kind {kind!r}; expected one of {KINDS}")


def make_samples(kind: str, seed: int, count: int, start: int = 0) -> Iterator[Sample]:
    """Samples for indices start..start+count-1. Kinds with several questions per scene or clip
    ("vqa", "ground", "video_qa") yield one sample per question, so more than `count` samples."""
    if kind not in KIND_SALT:
        raise ValueError(f"unknown Shapes World kind {kind!r}; expected one of {KINDS}")
    for index in range(start, start + count):
        for sample in _samples_at(kind, seed, index):
            yield with_pointing(sample)


def with_pointing(sample: Sample) -> Sample:
    """The sample with what it tells a location pointer written into its data (Sample.named_box,
    Sample.regions), so training reads it as it reads any dataset's boxes."""
    if (named := named_object(sample)) is not None:
        sample.meta["named_box"] = [named[0], list(named[1])]
    if regions := object_regions(sample):
        sample.meta["regions"] = [[segment, phrase, list(box)] for segment, phrase, box in regions]
    return sample

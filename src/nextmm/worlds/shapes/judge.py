"""A pixel judge for Shapes World images (spec: shared/shapes-world.md).

It reads back which objects an image shows -- colour, shape, size and box -- straight from the
pixels, so text-to-image output can be scored without a learned classifier that could share the
generator's mistakes. On the generator's own renders it recovers every object exactly; on noisy or
blurry images it degrades gracefully rather than inventing objects.

Steps: every pixel is explained as a mix of white and one palette colour; pixels that are more
colour than white are foreground; same-colour foreground pixels are grouped into components;
components too small to be an object are merged into a neighbour or dropped; each remaining
component is one object, its shape read from how it fills its bounding box.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from nextmm.worlds.shapes.generator import BACKGROUND, CANVAS, COLOURS, SHAPES, SIZES

Triple = tuple[str, str, str]  # (size, colour, shape), the order of the words in an object phrase

_NAMES = tuple(COLOURS)
_WHITE = np.array(BACKGROUND, dtype=np.float32)
_DIRS = np.array([COLOURS[c] for c in _NAMES], dtype=np.float32) - _WHITE  # white -> colour, (8, 3)

# A 10-px circle covers ~78 px, the smallest object; speckle from noise or a generator's artefacts
# is far smaller than that.
NOISE_FLOOR = 20
# Small sides are 10..16 and large 22..30: split the gap, leaving room for a blurred edge either way.
SIZE_SPLIT = 19


@dataclass(frozen=True)
class JudgedObject:
    colour: str
    shape: str
    size: str  # "small" or "large"
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in 64-px coordinates, x1/y1 exclusive
    pixels: int  # area of the component

    @property
    def triple(self) -> Triple:
        return (self.size, self.colour, self.shape)


# ----------------------------------------------------------------------------- pixels -> colour map

def _to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    # Compositing onto white makes transparent pixels background, whatever the mode was.
    rgba = image.convert("RGBA")
    image = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")
    if image.size != (CANVAS, CANVAS):
        # BOX averages whole source pixels, so a downscaled edge becomes a white/colour mix,
        # which the colour model below reads correctly.
        image = image.resize((CANVAS, CANVAS), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32)


def colour_map(image: Image.Image | np.ndarray) -> np.ndarray:
    """(64, 64) int array: the palette index of each pixel, or -1 for background.

    A plain nearest-colour rule fails on soft edges: half red, half white lies nearer orange than
    red. So each pixel is fitted as white + alpha * (colour - white) for every palette colour; the
    colour with the smallest residual wins, and the pixel is foreground when alpha >= 0.5, i.e.
    when it is more colour than white. That also puts a blurred edge where the true edge was.
    """
    px = _to_array(image).reshape(-1, 3) - _WHITE
    alpha = np.clip(px @ _DIRS.T / (_DIRS * _DIRS).sum(1), 0.0, 1.0)  # (N, 8)
    resid = ((px[:, None, :] - alpha[:, :, None] * _DIRS[None]) ** 2).sum(-1)
    best = resid.argmin(1)
    fg = alpha[np.arange(len(best)), best] >= 0.5
    return np.where(fg, best, -1).reshape(CANVAS, CANVAS)


# ----------------------------------------------------------------------------- components

def _components(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of equal, non-negative labels (BFS; 64x64 is small enough)."""
    grid = labels.tolist()
    h, w = labels.shape
    comp = [[-1] * w for _ in range(h)]
    n = 0
    for y0 in range(h):
        for x0 in range(w):
            c = grid[y0][x0]
            if c < 0 or comp[y0][x0] >= 0:
                continue
            comp[y0][x0] = n
            queue = deque([(y0, x0)])
            while queue:
                y, x = queue.popleft()
                for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                    if 0 <= ny < h and 0 <= nx < w and comp[ny][nx] < 0 and grid[ny][nx] == c:
                        comp[ny][nx] = n
                        queue.append((ny, nx))
            n += 1
    return np.array(comp), n


def _neighbours(mask: np.ndarray) -> np.ndarray:
    """The 8-neighbourhood ring around a mask."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= grown[:, :-1].copy()
    grown[:, :-1] |= grown[:, 1:].copy()
    return grown & ~mask


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _objects_masks(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(palette index, mask) of each object-sized component, with speckle absorbed."""
    comp, n = _components(labels)
    sizes = np.bincount(comp[comp >= 0].ravel(), minlength=n)
    big = [i for i in range(n) if sizes[i] >= NOISE_FLOOR]
    masks = {i: comp == i for i in big}
    # A mislabelled speck inside or on the edge of an object belongs to that object: noise flips
    # red pixels to orange and the like, and leaving them out would riddle the mask with holes
    # that skew its fill ratio. Specks with no object beside them are noise and vanish.
    for i in range(n):
        if sizes[i] >= NOISE_FLOOR:
            continue
        speck = comp == i
        around = Counter(comp[_neighbours(speck)].tolist())
        owners = [(count, j) for j, count in around.items() if j in masks]
        if owners:
            masks[max(owners)[1]] |= speck
    # A component is one colour by construction; absorbed specks do not change it.
    return [(int(labels[comp == i][0]), masks[i]) for i in big]


# ----------------------------------------------------------------------------- component -> object

def _shape(mask: np.ndarray) -> str:
    """Shape from the mask inside its bounding box.

    Fill ratio: a square fills its box (1.0), a circle pi/4 (0.785), triangle and diamond half.
    Those two differ in where their mass sits: a triangle (apex up) has 3/4 of its area in the
    lower half of the box, so its centroid is 2/3 of the way down; a diamond's is at 1/2.
    The circle cut sits above the 0.64 midpoint because blur rounds off a small diamond's tips,
    shrinking its box and raising its fill towards 0.7, while a circle's fill hardly moves.
    """
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(ys) / (h * w)
    if fill >= 0.9:
        return "square"
    if fill >= 0.70:
        return "circle"
    centroid = (ys.mean() - ys.min() + 0.5) / h
    return "triangle" if centroid >= 0.58 else "diamond"


def judge(image: Image.Image | np.ndarray) -> list[JudgedObject]:
    """The objects drawn on a Shapes World image, ordered like a caption (by box centre x, then y).

    Any size is accepted and resized to 64x64 first; a numpy HxWx3 uint8 array works as well.
    """
    labels = colour_map(image)
    found = []
    for colour, mask in _objects_masks(labels):
        box = _box(mask)
        side = max(box[2] - box[0], box[3] - box[1])
        size = "small" if side < SIZE_SPLIT else "large"
        found.append(JudgedObject(_NAMES[colour], _shape(mask), size, box, int(mask.sum())))
    return sorted(found, key=lambda o: (o.box[0] + o.box[2], o.box[1] + o.box[3]))


def describe(objects: list[Any]) -> list[Triple]:
    """(size, colour, shape) of each object, in the given order: judged objects or the generator's
    `Obj`s alike, so judged and true scenes compare directly."""
    return [(o.size, o.colour, o.shape) for o in objects]


# ----------------------------------------------------------------------------- prompts and scoring

_PHRASE = re.compile(
    r"\ban? ({sizes}) ({colours}) ({shapes})\b".format(
        sizes="|".join(SIZES), colours="|".join(COLOURS), shapes="|".join(SHAPES)))


def objects_in_caption(caption: str) -> list[Triple]:
    """The (size, colour, shape) of every object phrase `a {size} {colour} {shape}` in a caption,
    in reading order. Covers every caption form of the spec (`A`, `A to the left of B`, `A above B`,
    `A below B`, `A, B and C`, `A moves left`); words outside object phrases are ignored."""
    return [m.groups() for m in _PHRASE.finditer(caption.lower())]


def score_prompt(image: Image.Image | np.ndarray, wanted: list[Triple]) -> dict[str, Any]:
    """Score one generated image against the objects its prompt asked for.

    Wanted objects are matched one-to-one to judged objects of the same colour and shape, preferring
    a judged object of the same size too (so two wanted red circles need two drawn red circles).
    Returns:
      objects: per wanted object, in order, {"wanted": (size, colour, shape), "colour_shape": an
               object of that colour and shape was matched to it, "size": it also has that size,
               "box": the matched object's box or None}
      colour_shape_rate, size_rate: the fraction of wanted objects with "colour_shape" / "size"
               true (0.0 when nothing was wanted)
      judged: (size, colour, shape) of every object the judge found, in caption order
      extra: how many judged objects were left unmatched (drawn but not asked for)
      all_objects_right: every wanted object has colour_shape; extra objects and sizes are ignored
      exact: all_objects_right, every size right and no extra objects
    """
    judged = judge(image)
    free = list(range(len(judged)))
    match: list[int | None] = [None] * len(wanted)
    # Exact matches first, then colour+shape: within one colour+shape the objects are interchangeable,
    # so this maximises colour_shape matches and, among those, size matches.
    for exact in (True, False):
        for k, (size, colour, shape) in enumerate(wanted):
            if match[k] is not None:
                continue
            for j in free:
                o = judged[j]
                if (o.colour, o.shape) == (colour, shape) and (o.size == size or not exact):
                    match[k] = j
                    free.remove(j)
                    break
    per_object = []
    for (size, colour, shape), j in zip(wanted, match):
        o = None if j is None else judged[j]
        per_object.append({"wanted": (size, colour, shape), "colour_shape": o is not None,
                           "size": o is not None and o.size == size, "box": None if o is None else o.box})
    n = max(len(wanted), 1)  # nothing wanted: rates 0.0, and all_objects_right is vacuously true
    all_right = all(p["colour_shape"] for p in per_object)
    return {
        "objects": per_object,
        "colour_shape_rate": sum(p["colour_shape"] for p in per_object) / n,
        "size_rate": sum(p["size"] for p in per_object) / n,
        "judged": describe(judged),
        "extra": len(free),
        "all_objects_right": all_right,
        "exact": all_right and all(p["size"] for p in per_object) and not free,
    }

"""The built-in default dataset: generated scenes of coloured shapes with five captions each.

It lets a fresh install train and evaluate with no download. Some colour-shape combinations never appear
in training (HELD_OUT); the zero-shot folder asks the model to name them, which it can only do by
composing a colour and a shape it learned apart.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

VERSION = 1  # bump when the generator changes, so an old folder is regenerated
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 210, 40), "purple": (140, 60, 190), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": (10, 14), "large": (20, 26)}  # radius ranges in pixels on a 128 px canvas
HELD_OUT = (("green", "triangle"), ("blue", "star"), ("orange", "circle"), ("purple", "square"))
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
CANVAS = 128
SPLIT_SIZES = {"train": 2000, "val": 200, "test": 200}
ZERO_SHOT_PER_CLASS = 20


def default_root() -> Path:
    return Path("artifacts") / "data" / f"shapes-v{VERSION}"


def class_name(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.9
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.8), (cx + r * 0.95, cy + r * 0.8)], fill=fill)
    else:  # a five-pointed star: outer and inner radii alternating
        points = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                   cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        draw.polygon(points, fill=fill)


def _object(rng: random.Random, allowed: list[tuple[str, str]]) -> dict:
    colour, shape = rng.choice(allowed)
    size = rng.choice(list(SIZES))
    return {"colour": colour, "shape": shape, "size": size, "r": rng.uniform(*SIZES[size])}


def _canvas(rng: random.Random) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    grey = rng.randint(190, 250)
    tint = [max(0, min(255, grey + rng.randint(-12, 12))) for _ in range(3)]
    image = Image.new("RGB", (CANVAS, CANVAS), tuple(tint))
    return image, ImageDraw.Draw(image)


def _jitter(rgb, rng: random.Random):
    return tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in rgb)


def single_scene(rng: random.Random, colour: str, shape: str) -> tuple[Image.Image, list[str]]:
    image, draw = _canvas(rng)
    size = rng.choice(list(SIZES))
    r = rng.uniform(*SIZES[size])
    cx, cy = rng.uniform(r + 8, CANVAS - r - 8), rng.uniform(r + 8, CANVAS - r - 8)
    _draw(draw, shape, cx, cy, r, _jitter(COLOURS[colour], rng))
    captions = [f"a {size} {colour} {shape}", f"a {colour} {shape}", f"a photo of a {colour} {shape}",
                f"one {size} {colour} {shape} on a plain background", f"a {shape} that is {colour}"]
    return image, captions


def pair_scene(rng: random.Random, allowed: list[tuple[str, str]]) -> tuple[Image.Image, list[str]]:
    image, draw = _canvas(rng)
    a, b = _object(rng, allowed), _object(rng, allowed)
    relation = rng.choice(list(RELATIONS))
    # Place a and b in two halves of the canvas so the relation is unambiguous after a mild crop.
    horizontal = relation in ("left of", "right of")
    first_low = relation in ("left of", "above")
    for obj, low in ((a, first_low), (b, not first_low)):
        r = obj["r"]
        span = (r + 6, CANVAS / 2 - r / 2) if low else (CANVAS / 2 + r / 2, CANVAS - r - 6)
        along = rng.uniform(*span)
        across = rng.uniform(r + 8, CANVAS - r - 8)
        cx, cy = (along, across) if horizontal else (across, along)
        _draw(draw, obj["shape"], cx, cy, r, _jitter(COLOURS[obj["colour"]], rng))
    A = f"{a['colour']} {a['shape']}"
    B = f"{b['colour']} {b['shape']}"
    captions = [
        f"a {a['size']} {A} {relation} a {b['size']} {B}",
        f"a {B} {RELATIONS[relation]} a {A}",
        f"a {A} and a {B}",
        f"there is a {a['size']} {A} {relation} a {B}",
        f"a picture of a {A} next to a {b['size']} {B}",
    ]
    return image, captions


def generate(root: Path, seed: int = 0) -> Path:
    """Write the dataset under `root` (captions.jsonl + images/ + zero_shot/<class>/) unless it is there."""
    root = Path(root)
    marker = root / "COMPLETE"
    if marker.is_file():
        return root
    rng = random.Random(seed)
    seen = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT]
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for split, count in SPLIT_SIZES.items():
        for n in range(count):
            if rng.random() < 0.3:
                image, captions = single_scene(rng, *rng.choice(seen))
            else:
                image, captions = pair_scene(rng, seen)
            name = f"{split}_{n:05d}.png"
            image.save(root / "images" / name)
            lines += [json.dumps({"image": name, "caption": c, "split": split}) for c in captions]
    for colour in COLOURS:
        for shape in SHAPES:
            folder = root / "zero_shot" / class_name(colour, shape).replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(ZERO_SHOT_PER_CLASS):
                single_scene(rng, colour, shape)[0].save(folder / f"{n:03d}.png")
    held_out = [class_name(*c) for c in HELD_OUT]
    (root / "zero_shot" / "held_out.json").write_text(json.dumps(held_out), encoding="utf-8")
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "README.txt").write_text(
        "miniclip's built-in shapes dataset (generated). Held out of training: "
        + ", ".join(held_out) + ".\n", encoding="utf-8")
    marker.write_text(str(VERSION))
    return root

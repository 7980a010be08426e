"""Scenes: a captioning data set stepwise generates itself, seeded, of any size.

The spec, so anyone can render test images from it: 64x64 RGB on white; 1 to 3
non-overlapping shapes from {circle, square, triangle} in {red 255,0,0; green
0,160,0; blue 0,0,255; yellow 230,200,0}, each 14 to 24 px across, at random
positions. Captions are lower case without punctuation:
- one shape: "a red circle"
- two: "a red circle left of a blue square" when the horizontal distance between
  the centres is the larger (the left shape first), otherwise "a red circle above
  a blue square" (the upper shape first)
- three, left to right by centre: "a red circle a blue square and a green triangle"
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64
BACKGROUND = (255, 255, 255)  # white; serving composites transparent images onto it
COLOURS = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "yellow": (230, 200, 0)}
SHAPES = ("circle", "square", "triangle")
MIN_SIDE, MAX_SIDE = 14, 24


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x0: int  # bounding box, inclusive-exclusive: [x0, x0 + side)
    y0: int
    side: int

    @property
    def centre(self) -> tuple[float, float]:
        return self.x0 + self.side / 2, self.y0 + self.side / 2

    def overlaps(self, other: Shape, gap: int = 1) -> bool:
        return not (self.x0 + self.side + gap <= other.x0 or other.x0 + other.side + gap <= self.x0
                    or self.y0 + self.side + gap <= other.y0
                    or other.y0 + other.side + gap <= self.y0)  # fmt: skip

    def phrase(self) -> str:
        return f"a {self.colour} {self.kind}"


def caption(shapes: list[Shape]) -> str:
    if len(shapes) == 1:
        return shapes[0].phrase()
    if len(shapes) == 2:
        a, b = shapes
        dx = abs(a.centre[0] - b.centre[0])
        dy = abs(a.centre[1] - b.centre[1])
        if dx > dy:
            left, right = sorted(shapes, key=lambda s: s.centre[0])
            return f"{left.phrase()} left of {right.phrase()}"
        upper, lower = sorted(shapes, key=lambda s: s.centre[1])
        return f"{upper.phrase()} above {lower.phrase()}"
    first, second, third = sorted(shapes, key=lambda s: s.centre)
    return f"{first.phrase()} {second.phrase()} and {third.phrase()}"


def draw(shapes: list[Shape]) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for s in shapes:
        box = (s.x0, s.y0, s.x0 + s.side - 1, s.y0 + s.side - 1)
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            pen.ellipse(box, fill=fill)
        elif s.kind == "square":
            pen.rectangle(box, fill=fill)
        else:  # triangle, apex up
            pen.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])],
                        fill=fill)  # fmt: skip
    return image


def random_scene(rng: random.Random) -> list[Shape]:
    while True:  # rejection sampling; three shapes of at most 24 px always fit eventually
        shapes: list[Shape] = []
        for _ in range(rng.randint(1, 3)):
            for _attempt in range(100):
                side = rng.randint(MIN_SIDE, MAX_SIDE)
                x0, y0 = rng.randint(0, SIZE - side), rng.randint(0, SIZE - side)
                shape = Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), x0, y0, side)
                if not any(shape.overlaps(other) for other in shapes):
                    shapes.append(shape)
                    break
            else:
                break
        else:
            return shapes


def make_scenes(n: int, seed: int) -> list[tuple[Image.Image, str, list[Shape]]]:
    """n scenes as (image, caption, shapes); the same seed gives the same scenes."""
    rng = random.Random(seed)
    scenes = []
    for _ in range(n):
        shapes = random_scene(rng)
        scenes.append((draw(shapes), caption(shapes), shapes))
    return scenes


def load_flickr8k(images_dir: Path, captions_file: Path) -> list[tuple[Path, str]]:
    """Flickr8k-style local data: `name.jpg#k<TAB>caption` lines and an images folder.

    For users who have the data; returns (image path, lower-cased caption) pairs
    whose image exists. Never downloads anything.
    """
    pairs = []
    for line in Path(captions_file).read_text(encoding="utf-8").splitlines():
        if "\t" not in line:
            continue
        key, text = line.split("\t", 1)
        path = Path(images_dir) / key.split("#", 1)[0]
        if path.is_file():
            pairs.append((path, " ".join(text.lower().split())))
    return pairs

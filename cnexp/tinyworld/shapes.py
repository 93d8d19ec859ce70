"""Synthetic condition/image/caption triples in the fill50k layout.

The condition is the white outline of one or two shapes on black; the target is the same shapes
filled with named colours on a coloured background; the caption names shapes and colours. Every
sample is a pure function of (seed, index), so a split is reproducible on any machine.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from cnexp.fileio import atomic_write, exclusive

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZE = 64
OUTLINE_WIDTH = 2


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cx: float
    cy: float
    r: float  # half the bounding-box side

    def points(self) -> list[tuple[float, float]]:
        if self.kind == "triangle":
            angles = (-90.0, 30.0, 150.0)
            return [(self.cx + self.r * math.cos(math.radians(a)),
                     self.cy + self.r * math.sin(math.radians(a))) for a in angles]
        return [(self.cx - self.r, self.cy - self.r), (self.cx + self.r, self.cy + self.r)]

    def draw(self, canvas: ImageDraw.ImageDraw, fill=None, outline=None, width: int = 1) -> None:
        pts = self.points()
        if self.kind == "circle":
            canvas.ellipse(pts, fill=fill, outline=outline, width=width)
        elif self.kind == "square":
            canvas.rectangle(pts, fill=fill, outline=outline, width=width)
        else:
            canvas.polygon(pts, fill=fill, outline=outline, width=width)


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]

    def caption(self) -> str:
        parts = [f"a {s.colour} {s.kind}" for s in self.shapes]
        return f"{' and '.join(parts)} on a {self.background} background"

    def condition(self) -> Image.Image:
        img = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
        canvas = ImageDraw.Draw(img)
        for s in self.shapes:
            s.draw(canvas, outline=(255, 255, 255), width=OUTLINE_WIDTH)
        return img

    def target(self) -> Image.Image:
        img = Image.new("RGB", (SIZE, SIZE), COLOURS[self.background])
        canvas = ImageDraw.Draw(img)
        for s in self.shapes:
            s.draw(canvas, fill=COLOURS[s.colour])
        return img


def sample_scene(rng: random.Random, max_shapes: int = 2) -> Scene:
    """One scene: non-overlapping shapes, no shape the colour of the background."""
    background = rng.choice(list(COLOURS))
    n = rng.randint(1, max_shapes)
    shapes: list[Shape] = []
    while len(shapes) < n:
        r = rng.uniform(8, 15)
        cx, cy = rng.uniform(r + 2, SIZE - r - 2), rng.uniform(r + 2, SIZE - r - 2)
        if any(math.hypot(cx - s.cx, cy - s.cy) < r + s.r + 3 for s in shapes):
            continue
        colour = rng.choice([c for c in COLOURS if c != background])
        shapes.append(Shape(rng.choice(SHAPES), colour, cx, cy, r))
    return Scene(background, tuple(shapes))


def scene_at(seed: int, index: int, max_shapes: int = 2) -> Scene:
    return sample_scene(random.Random(f"{seed}:{index}"), max_shapes)


def write_fill50k(root: Path, n: int, seed: int, max_shapes: int = 2) -> Path:
    """Write `n` triples under `root` as prompt.json + source/ + target/ (the authors' layout)."""
    root = Path(root)
    (root / "source").mkdir(parents=True, exist_ok=True)
    (root / "target").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        scene = scene_at(seed, i, max_shapes)
        scene.condition().save(root / "source" / f"{i}.png")
        scene.target().save(root / "target" / f"{i}.png")
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png",
                                 "prompt": scene.caption()}))
    # prompt.json appears only once every image is written
    atomic_write(root / "prompt.json", "\n".join(lines) + "\n")
    return root


SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def ensure_tiny_dataset(root: Path, sizes: dict[str, int]) -> Path:
    """Generate the tiny-world splits under root/{train,val,test} unless already complete."""
    root = Path(root)

    def complete(split: str) -> bool:
        index = root / split / "prompt.json"
        if not index.exists():
            return False
        with index.open() as lines:
            return sum(1 for _ in lines) == sizes[split]

    if all(complete(split) for split in sizes):
        return root
    # two first runs at once: one writes, the other waits and then finds the splits complete
    # (without the lock it could read an image the first is still rewriting)
    with exclusive(root.parent / f".{root.name}.generate", "generating the tiny-world data"):
        for split, n in sizes.items():
            if not complete(split):
                write_fill50k(root / split, n, seed=SPLIT_SEEDS[split])
    return root

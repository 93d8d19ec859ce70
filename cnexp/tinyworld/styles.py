"""What the tiny world's condition shows of each shape: `data.condition_style`.

- outline: the shape's white outline (the generated `source/` files). It fixes the kind (circle,
  square, triangle), so a model never needs the prompt to know what to draw.
- extent: four corner marks of the square each shape's position and size span (centre cx, cy,
  half-side r). The generator draws the kind independently of (cx, cy, r) (shapes.sample_scene),
  and the marks are a function of (cx, cy, r) alone, so the condition has exactly the same
  distribution for every kind: only the prompt can say which kind to draw. It still says where
  and how large, which the fidelity metrics score.
- dotted: the extent's corner marks, set FRAME_PAD px further out, plus DOTS dots on the shape's
  own outline, at the same polar angles about (cx, cy) for every kind (a phase hashed from the
  shape's cx, cy, r, never from its kind). The dots are a small share of the outline, so copying
  the condition's pixels draws no filled shape; the marks fix the footprint, every kind shows the
  same number of white pixels, so fill ratio, extent and aspect read the kind at chance; but
  where the dots lie (at one radius, on a square, on a triangle) gives the kind to a model that
  recognises an outline from a few points. The style for prompt dropout's semantic claim: with
  no prompt the control must *read* the kind, which extent cannot test (there every arm guesses).
  Dots, not partial outlines: a stretch of outline shows a corner or a curve to a 3x3 filter and
  its hull nearly fills the shape; single dots say nothing alone, only together.

Why a style applied when a condition is loaded, not a second data set: the tiny world's existing
triples are reused as they are (the same targets, captions and splits), every sample's styled
condition is a pure function of its scene (no randomness: identical in every run and seed), and
nothing on disk can mix the styles. The scene of sample i of a split is
shapes.scene_at(SPLIT_SEEDS[split], i); each load checks it against the sample's caption, so a
fill50k root that is not the generated tiny world is refused instead of restyled wrongly.

Fidelity (cnexp/metrics/fidelity.py's outline scores) keeps scoring against the ordinary outline
of the target (the `source/` file, carried as the evaluation items' "outline"): shape IoU, edge
F1 and kind accuracy mean the same under every style, and kind accuracy asks whether the sample
drew the target's kind, which the extent marks do not show and the dots show only to a reader.

The styled source's fingerprints include the style, so the frozen-encoder cache and the data
check's scan cache (cnexp/data/scan.py) never reuse what a run of another style stored.
"""
from __future__ import annotations

import hashlib
import math

from PIL import Image, ImageDraw

from cnexp.data.images import DataError, Sample
from cnexp.tinyworld.shapes import OUTLINE_WIDTH, SIZE, SPLIT_SEEDS, Scene, scene_at

OUTLINE, EXTENT, DOTTED = "outline", "extent", "dotted"
MARK_SHARE = 1 / 3  # a corner mark's arm, as a share of the half-side r
WHITE = (255, 255, 255)
# 7: prime to the square's 4-fold and the triangle's 3-fold symmetry, so no phase puts every dot
# at one radius (8 dots at 22.5 deg + k 45 deg lie on a square's circumcircle: a circle)
DOTS = 7
DOT_RADIUS = 1.0  # px: a dot is ~3 px across, like a short stretch of the 2 px outline
# px between the box and the dotted style's marks: a square's dots lie on the box, and one that
# touched a mark would hide pixels there, so squares would show fewer white pixels than the rest
FRAME_PAD = 3.0


def _corner_marks(canvas: ImageDraw.ImageDraw, s, pad: float = 0.0) -> None:
    """Four L-shaped marks at the corners of the box [cx - r - pad, cx + r + pad]^2 (in y too)."""
    arm, half = max(3.0, s.r * MARK_SHARE), s.r + pad
    for sx in (-1, 1):
        for sy in (-1, 1):
            x, y = s.cx + sx * half, s.cy + sy * half  # a corner; the arms point inwards
            canvas.line([(x, y), (x - sx * arm, y)], fill=WHITE, width=OUTLINE_WIDTH)
            canvas.line([(x, y), (x, y - sy * arm)], fill=WHITE, width=OUTLINE_WIDTH)


def extent_condition(scene: Scene) -> Image.Image:
    """Each shape as four L-shaped corner marks of the box [cx - r, cx + r] x [cy - r, cy + r]:
    where and how large, not which kind."""
    img = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    canvas = ImageDraw.Draw(img)
    for s in scene.shapes:
        _corner_marks(canvas, s)
    return img


def outline_radius(kind: str, angle: float) -> float:
    """Distance from (cx, cy) to the outline of a `kind` with r = 1 along `angle` (radians,
    image axes: y down). The triangle's vertices are at -90, 30, 150 deg (Shape.points), so its
    edges face 90, 210, 330 deg at the inradius 1/2."""
    if kind == "circle":
        return 1.0
    if kind == "square":
        return 1.0 / max(abs(math.cos(angle)), abs(math.sin(angle)))
    return 0.5 / max(math.cos(angle - math.radians(n)) for n in (90.0, 210.0, 330.0))


def dot_phase(s) -> float:
    """The first dot's angle: a pure function of the shape's position and size, not its kind,
    so the dots of the three kinds sit at the same angles and only their radii differ."""
    digest = hashlib.sha1(f"{s.cx!r},{s.cy!r},{s.r!r}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 * 2 * math.pi


def dot_centres(s) -> list[tuple[float, float]]:
    """The dotted style's DOTS points on the outline of shape `s`, evenly spaced in angle."""
    angles = [dot_phase(s) + 2 * math.pi * k / DOTS for k in range(DOTS)]
    return [(s.cx + s.r * outline_radius(s.kind, a) * math.cos(a),
             s.cy + s.r * outline_radius(s.kind, a) * math.sin(a)) for a in angles]


def dotted_condition(scene: Scene) -> Image.Image:
    """Each shape as DOTS dots on its outline inside corner marks of its (padded) box: where and
    how large for anyone, which kind for a model that recognises an outline from a few points."""
    img = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    canvas = ImageDraw.Draw(img)
    for s in scene.shapes:
        _corner_marks(canvas, s, FRAME_PAD)
        for x, y in dot_centres(s):
            canvas.ellipse([x - DOT_RADIUS, y - DOT_RADIUS, x + DOT_RADIUS, y + DOT_RADIUS],
                           fill=WHITE)
    return img


# style -> scene -> condition (outline: the files as written)
STYLED = {EXTENT: extent_condition, DOTTED: dotted_condition}


def styled_condition(scene: Scene, style: str) -> Image.Image:
    return scene.condition() if str(style) == OUTLINE else STYLED[str(style)](scene)


class StyledSource:
    """A tiny-world split's source whose conditions are drawn in `style`; the rest (targets,
    captions, file names) is the wrapped source's. `reference_condition` is the ordinary outline,
    which fidelity scores against."""

    def __init__(self, source, split: str, style: str):
        self.source, self.split, self.style = source, split, str(style)
        self.seed = SPLIT_SEEDS[split]

    def __len__(self) -> int:
        return len(self.source)

    def __getattr__(self, name: str):  # files, name, with_condition, ...: the wrapped source's
        if name == "source":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)

    def _styled(self, index: int, origin: str) -> Image.Image:
        scene = scene_at(self.seed, index)
        captions = self.source.captions(index)
        if captions != [scene.caption()]:
            raise DataError(
                f"{origin}: data.condition_style={self.style} redraws the tiny world's conditions "
                f"from its scenes, but this sample is not scene {index} of the generated "
                f"'{self.split}' split (caption {captions[:1]} != [{scene.caption()!r}]). Use it "
                "with data generated by data.generate_tinyworld=true (sizes unchanged), or "
                "data.condition_style=outline")
        return styled_condition(scene, self.style)

    def load(self, index: int) -> Sample:
        sample = self.source.load_image(index)  # the outline file is redrawn, not decoded
        return Sample(sample.image, self._styled(index, sample.origin), sample.captions,
                      sample.origin)

    def load_condition(self, index: int):
        _, size, origin = self.source.load_condition(index)
        return self._styled(index, origin), size, origin

    def reference_condition(self, index: int) -> Image.Image:
        """The ordinary outline (the generated source/ file) that fidelity scores against."""
        condition, _, _ = self.source.load_condition(index)
        return condition

    def fingerprint(self) -> str:
        return _with_style(self.source.fingerprint(), self.style)

    def content_fingerprint(self) -> str:
        inner = getattr(self.source, "content_fingerprint", None) or self.source.fingerprint
        return _with_style(inner(), self.style)


def _with_style(fingerprint: str, style: str) -> str:
    return hashlib.sha1(f"{fingerprint}|condition_style={style}".encode()).hexdigest()


def restyle_sources(sources: dict, cfg) -> dict:
    """The fill50k layout's sources with data.condition_style applied (unchanged for outline)."""
    style = str(getattr(cfg, "condition_style", OUTLINE))
    if style == OUTLINE:
        return sources
    if style not in STYLED:
        raise DataError(f"data.condition_style={style} is unknown: use outline or "
                        f"{', '.join(STYLED)}")
    if cfg.annotator is not None or set(sources) != set(SPLIT_SEEDS):
        raise DataError(f"data.condition_style={style} redraws the tiny world's conditions: it "
                        "needs the generated train/ val/ test/ splits "
                        "(data.generate_tinyworld=true) and no data.annotator; set "
                        "data.condition_style=outline for other data")
    return {split: StyledSource(source, split, style) for split, source in sources.items()}

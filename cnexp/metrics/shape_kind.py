"""Does the sample draw the *kind* of shape each outline shows (tiny world: circle, square,
triangle)?

Shape IoU asks "where": a round blob inside a square outline scores well. The paper's semantic
claims (ControlNet-lite and prompt dropout) are about the model recognising what the condition
shows when the prompt does not say it, so this metric asks "what": for each outlined shape,
which of the three kinds, drawn at the outline's place and size, best explains the sample's
foreground there. Under the conflicting prompt, which names other shapes, it tells whether the
condition or the prompt decides the shape.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from cnexp.tinyworld.shapes import SHAPES, Shape

MIN_MATCH_IOU = 0.3  # below this no kind explains the drawing: nothing recognisable was drawn
WINDOW_MARGIN = 3  # px around an outline's box in which the sample's drawing is read


def _fitted(kind: str, box: tuple[int, int, int, int]) -> Shape:
    """The shape of `kind` whose filled drawing spans the bounding box (top, bottom, left,
    right, inclusive) of an outline component."""
    top, bottom, left, right = box
    cx = (left + right + 1) / 2
    if kind == "triangle":  # apex up, vertices at -90/30/150 degrees: width 2 r cos 30
        r = (right - left + 1) / (2 * math.cos(math.radians(30)))
        return Shape(kind, "white", cx, top + r, r)
    return Shape(kind, "white", cx, (top + bottom + 1) / 2, (right - left + 1) / 2)


def _template(shape: Shape, size: tuple[int, int]) -> np.ndarray:
    img = Image.new("L", (size[1], size[0]), 0)
    shape.draw(ImageDraw.Draw(img), fill=255)
    return np.asarray(img) > 0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def _window(rows: slice, cols: slice, shape: tuple[int, int]) -> tuple[slice, slice]:
    """Where a shape's drawing is read: its box and WINDOW_MARGIN around it."""
    h, w = shape
    return (slice(max(0, rows.start - WINDOW_MARGIN), min(h, rows.stop + WINDOW_MARGIN)),
            slice(max(0, cols.start - WINDOW_MARGIN), min(w, cols.stop + WINDOW_MARGIN)))


def _best_kind(mask: np.ndarray, box: tuple[int, int, int, int],
               window: tuple[slice, slice]) -> tuple[str, float]:
    scores = {kind: _iou(_template(_fitted(kind, box), mask.shape)[window], mask[window])
              for kind in SHAPES}
    kind = max(scores, key=scores.get)
    return kind, scores[kind]


def shape_kinds(filled_outline: np.ndarray, drawn: np.ndarray) -> list[tuple[str, str | None]]:
    """(outlined kind, drawn kind or None) for each outlined shape.

    filled_outline: bool (H, W), the condition's outlines with their holes filled; drawn: bool
    (H, W), the sample's foreground."""
    labels, count = ndimage.label(filled_outline)
    pairs = []
    for index, found in enumerate(ndimage.find_objects(labels), start=1):
        rows, cols = found
        box = (rows.start, rows.stop - 1, cols.start, cols.stop - 1)
        window = _window(rows, cols, filled_outline.shape)
        outlined, _ = _best_kind(labels == index, box, window)
        kind, match = _best_kind(drawn, box, window)
        pairs.append((outlined, kind if match >= MIN_MATCH_IOU else None))
    return pairs


def kind_accuracy(filled_outline: np.ndarray, drawn: np.ndarray) -> float:
    """Share of the outlined shapes drawn as their own kind (1.0 when nothing is outlined)."""
    pairs = shape_kinds(filled_outline, drawn)
    return float(np.mean([a == b for a, b in pairs])) if pairs else 1.0


def drawn_kind(drawn: np.ndarray) -> str | None:
    """The kind of the largest shape in a foreground mask, read as above at its own box; None
    when nothing is drawn or no kind explains it. Without a condition (a base's sample) this
    asks whether the prompt's kind was drawn, wherever it was drawn."""
    labels, count = ndimage.label(drawn)
    if count == 0:
        return None
    largest = 1 + int(np.argmax(ndimage.sum(drawn, labels, range(1, count + 1))))
    rows, cols = ndimage.find_objects(labels)[largest - 1]
    mask = labels == largest
    box = (rows.start, rows.stop - 1, cols.start, cols.stop - 1)
    kind, match = _best_kind(mask, box, _window(rows, cols, mask.shape))
    return kind if match >= MIN_MATCH_IOU else None

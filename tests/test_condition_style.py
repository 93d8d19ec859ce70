"""data.condition_style: the tiny world's `extent` conditions leave the shape's kind open (the
prompt must say it), the ordinary outline fixes it, and `dotted` keeps it only for a reader
(low-level statistics see chance, an outline fit finds it); styled conditions never share a
cache key with other styles, and fidelity keeps scoring against the outline."""
from __future__ import annotations

import dataclasses
import itertools
import math
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import ndimage, optimize

from cnexp.config import DataConfig
from cnexp.data.dataset import TriplesDataset
from cnexp.data.images import DataError
from cnexp.data.scan import scan
from cnexp.metrics.fidelity import outline_mask
from cnexp.metrics.shape_kind import shape_kinds
from cnexp.tinyworld.shapes import SHAPES, ensure_tiny_dataset, sample_scene, scene_at
from cnexp.tinyworld.styles import (DOTS, StyledSource, dot_centres, dot_phase,
                                    dotted_condition, extent_condition, outline_radius)

SIZES = {"train": 6, "val": 4, "test": 2}


def one_shape_scenes(n: int, seed: int = 0):
    return [sample_scene(random.Random(f"style:{seed}:{i}"), max_shapes=1) for i in range(n)]


def pixels(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def with_kind(scene, kind: str):
    return dataclasses.replace(scene, shapes=tuple(dataclasses.replace(s, kind=kind)
                                                   for s in scene.shapes))


def test_extent_condition_is_the_same_for_every_kind_and_the_outline_is_not():
    # the generator draws the kind independently of position and size, and the extent marks
    # depend on those alone: a scene's condition is identical whichever kinds it holds, so the
    # kinds cannot be told apart from the conditions (their distributions are equal)
    for scene in [scene_at(0, i) for i in range(40)]:
        extents = [pixels(extent_condition(with_kind(scene, k))) for k in SHAPES]
        outlines = [pixels(with_kind(scene, k).condition()) for k in SHAPES]
        assert all(np.array_equal(extents[0], e) for e in extents[1:])
        assert not any(np.array_equal(outlines[0], o) for o in outlines[1:])
        assert extents[0].any()  # it still shows where the shapes are


def fill_features(condition: np.ndarray) -> tuple[float, float]:
    """A kind classifier's features: filled area over bounding-box area, and box aspect."""
    filled = ndimage.binary_fill_holes(outline_mask(condition))
    rows, cols = np.nonzero(filled)
    h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
    return filled.sum() / (h * w), h / w


def nearest_centroid_accuracy(features: np.ndarray, kinds: list[str]) -> float:
    """Trained on the first half, scored on the second."""
    half = len(kinds) // 2
    labels = np.array(kinds)
    centroids = {k: features[:half][labels[:half] == k].mean(0) for k in SHAPES}
    guess = [min(SHAPES, key=lambda k: np.linalg.norm(f - centroids[k])) for f in features[half:]]
    return float(np.mean(np.array(guess) == labels[half:]))


def test_a_kind_classifier_reads_the_outline_but_is_at_chance_on_extent_and_dotted():
    scenes = one_shape_scenes(600)
    kinds = [s.shapes[0].kind for s in scenes]
    outline = np.array([fill_features(pixels(s.condition())) for s in scenes])
    extent = np.array([fill_features(pixels(extent_condition(s))) for s in scenes])
    assert nearest_centroid_accuracy(outline, kinds) > 0.95
    assert nearest_centroid_accuracy(extent, kinds) < 0.42  # chance: 1/3 (+- 0.03 at 300)
    dotted = np.array([fill_features(pixels(dotted_condition(s))) for s in scenes])
    assert nearest_centroid_accuracy(dotted, kinds) < 0.42
    # the kind-accuracy metric's own reading of the outlined kind is right on outlines
    read = [shape_kinds(ndimage.binary_fill_holes(outline_mask(pixels(s.condition()))),
                        np.zeros((64, 64), bool))[0][0] for s in scenes[:60]]
    assert np.mean(np.array(read) == np.array(kinds[:60])) > 0.95


def kind_variants(scene, kind: str):
    return dataclasses.replace(scene, shapes=(dataclasses.replace(scene.shapes[0], kind=kind),))


def test_dotted_is_a_pure_function_of_the_scene_with_dots_on_each_kinds_own_outline():
    for scene in [scene_at(0, i) for i in range(30)]:
        assert np.array_equal(pixels(dotted_condition(scene)), pixels(dotted_condition(scene)))
        for s in scene.shapes:  # the dots' angles come from position and size, never the kind
            assert len({dot_phase(dataclasses.replace(s, kind=k)) for k in SHAPES}) == 1
    def distances(dots_of: str, outline_of: str, scene) -> np.ndarray:
        """px from each dot of a `dots_of` shape to the drawn outline of an `outline_of` one"""
        outline = outline_mask(pixels(kind_variants(scene, outline_of).condition()))
        to_outline = ndimage.distance_transform_edt(~outline)
        return np.array([to_outline[round(y), round(x)]
                         for x, y in dot_centres(kind_variants(scene, dots_of).shapes[0])])

    for scene in one_shape_scenes(60):
        for kind in SHAPES:
            assert distances(kind, kind, scene).max() <= 1.5  # on its own outline, as drawn
            for other in set(SHAPES) - {kind}:  # and visibly off the other kinds' outlines
                assert distances(kind, other, scene).max() >= 1


def test_copying_dotted_pixels_draws_no_filled_shape():
    # (a) the dots cover a small share of the outline, and filling the condition's holes (a
    # pixel copy's best guess at the filled shape) gives almost nothing of the shape
    shares, ious = [], []
    for scene in one_shape_scenes(200):
        outline, dotted = (outline_mask(pixels(c)) for c in (scene.condition(),
                                                           dotted_condition(scene)))
        shares.append((outline & dotted).sum() / outline.sum())
        shape, copy = ndimage.binary_fill_holes(outline), ndimage.binary_fill_holes(dotted)
        ious.append((shape & copy).sum() / (shape | copy).sum())
    assert np.mean(shares) < 0.3 and max(ious) < 0.25


def test_dotted_footprint_is_the_same_for_every_kind():
    # (b) the marks fix the extent and no dot hides under a mark: the white pixels' bounding
    # box is identical for the three kinds and their counts agree on average (the nearest-
    # centroid test above reads the kind at chance from fill ratio and aspect)
    counts = {kind: [] for kind in SHAPES}
    for scene in one_shape_scenes(200):
        boxes = set()
        for kind in SHAPES:
            rows, cols = np.nonzero(outline_mask(pixels(dotted_condition(kind_variants(scene,
                                                                                       kind)))))
            boxes.add((rows.min(), rows.max(), cols.min(), cols.max()))
            counts[kind].append(rows.size)
        assert len(boxes) == 1
    means = [np.mean(counts[kind]) for kind in SHAPES]
    assert max(means) - min(means) < 0.01 * min(means)


def dot_centres_seen(condition: np.ndarray) -> np.ndarray:
    """(n, 2) x, y of the condition's dots: components no wider than 3 px (a mark's arm is
    longer; two touching dots are dropped, the fit needs only a few)."""
    labels, _ = ndimage.label(outline_mask(condition))
    dots = [i for i, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1)
            if max(rows.stop - rows.start, cols.stop - cols.start) <= 3]
    return np.array(ndimage.center_of_mass(labels > 0, labels, dots)).reshape(-1, 2)[:, ::-1]


def fitted_kind(points: np.ndarray) -> str:
    """The kind whose outline, at the centre and size that fit best, passes nearest the dots:
    recognition from the condition alone (the scene's centre and size are not given)."""
    def misfit(kind: str) -> float:
        def residuals(p):  # p: cx, cy, r
            return [math.hypot(x - p[0], y - p[1])
                    - p[2] * outline_radius(kind, math.atan2(y - p[1], x - p[0]))
                    for x, y in points]
        centre = points.mean(0)
        size = np.hypot(*(points - centre).T).mean()
        return optimize.least_squares(residuals, [*centre, size]).cost
    return min(SHAPES, key=misfit)


def test_an_outline_fit_reads_the_kind_from_dotted_conditions():
    # (c) the kind is in the condition, for a reader that fits outlines to the dots
    scenes = one_shape_scenes(120, seed=1)
    found = [fitted_kind(dot_centres_seen(pixels(dotted_condition(s)))) for s in scenes]
    assert np.mean(np.array(found) == np.array([s.shapes[0].kind for s in scenes])) > 0.9
    assert all(len(dot_centres_seen(pixels(dotted_condition(s)))) >= DOTS - 2 for s in scenes)
    # and not from extent conditions' pixels, which hold no dots to fit
    assert not dot_centres_seen(pixels(extent_condition(scenes[0]))).size


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return ensure_tiny_dataset(tmp_path_factory.mktemp("tinyworld"), SIZES)


def data_cfg(root, style: str, **more):
    return OmegaConf.merge(OmegaConf.structured(DataConfig),
                           {"root": str(root), "condition_style": style, **more})


def sources(root, style: str, **more) -> dict:
    from cnexp.data.datamodule import open_sources

    return open_sources(data_cfg(root, style, **more), None)


@pytest.mark.parametrize("style, draw", [("extent", extent_condition),
                                         ("dotted", dotted_condition)])
def test_a_style_is_applied_when_loaded_and_evaluation_items_carry_the_outline(
        tiny_root, style, draw, monkeypatch):
    plain, styled = sources(tiny_root, "outline"), sources(tiny_root, style)
    plain_load = type(plain["val"]).load
    monkeypatch.setattr(type(plain["val"]), "load", lambda *a: pytest.fail(
        "a styled load decodes the outline file it redraws"))
    assert isinstance(styled["val"], StyledSource) and not isinstance(plain["val"], StyledSource)
    for split, seed in (("train", 0), ("val", 1)):
        sample = styled[split].load(2)
        assert np.array_equal(pixels(sample.condition), pixels(draw(scene_at(seed, 2))))
        assert sample.captions == plain_load(plain[split], 2).captions
    # the training path that skips decoding the image sees the same styled condition
    assert np.array_equal(pixels(styled["train"].load_condition(1)[0]),
                          pixels(styled["train"].load(1).condition))
    val = TriplesDataset(styled["val"], 64)
    item = val[0]
    monkeypatch.undo()
    ordinary = TriplesDataset(plain["val"], 64)[0]
    assert torch.equal(item["outline"], ordinary["condition"])  # what fidelity scores
    assert not torch.equal(item["condition"], ordinary["condition"])
    assert torch.equal(item["image"], ordinary["image"])
    assert "outline" not in TriplesDataset(styled["train"], 64, train=True)[0]


def test_styles_never_share_a_cache_key(tiny_root, tmp_path):
    for one, other in itertools.combinations(("outline", "extent", "dotted"), 2):
        a, b = sources(tiny_root, one), sources(tiny_root, other)
        for split in ("train", "val"):
            assert a[split].fingerprint() != b[split].fingerprint()  # encoder cache
            assert a[split].content_fingerprint() != b[split].content_fingerprint()
            assert (TriplesDataset(a[split], 64).fingerprint()
                    != TriplesDataset(b[split], 64).fingerprint())
    plain, styled = sources(tiny_root, "outline"), sources(tiny_root, "extent")
    facts, cached = scan(plain["val"], str(tmp_path))
    styled_facts, styled_cached = scan(styled["val"], str(tmp_path))
    assert not cached and not styled_cached  # the data check scans each style itself
    assert [f.content for f in facts] != [f.content for f in styled_facts]
    assert scan(styled["val"], str(tmp_path))[1]  # and reuses its own


def test_extent_refuses_data_that_is_not_the_generated_tiny_world(tiny_root, tmp_path):
    with pytest.raises(DataError, match="data.condition_style=extent"):
        sources(tiny_root, "extent", annotator="canny")
    with pytest.raises(DataError, match="data.condition_style=extent"):
        sources(tiny_root / "train", "extent")  # one root: not the generated splits
    # a layout that declares no styles (cnexp/data/layout.py condition_styles) says which does
    with pytest.raises(DataError, match="data.layout=captions cannot: use data.layout=fill50k"):
        sources(tiny_root, "dotted", layout="captions")
    other = ensure_tiny_dataset(tmp_path / "other", SIZES)
    # val's index (its captions) as train's: the files exist, but they are other scenes
    (other / "train" / "prompt.json").write_text((other / "val" / "prompt.json").read_text())
    with pytest.raises(DataError, match="not scene 0 of the generated 'train' split"):
        sources(other, "extent")["train"].load(0)


def test_the_evaluation_batch_carries_the_outline_only_when_restyled(tiny_root, tmp_path):
    from cnexp.data.datamodule import TriplesDataModule

    batches = {}
    for style in ("outline", "extent", "dotted"):
        cfg = data_cfg(tiny_root, style, eval_size=3, cache_dir=str(tmp_path / "cache"))
        batches[style] = TriplesDataModule(cfg).eval_batch()
    assert "outline" not in batches["outline"]
    for style in ("extent", "dotted"):
        assert torch.equal(batches[style]["outline"], batches["outline"]["condition"])
        assert not torch.equal(batches[style]["condition"], batches["outline"]["condition"])

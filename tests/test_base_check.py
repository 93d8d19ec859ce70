"""A tiny-world base's own check (cnexp/tinyworld/base_check.py): the shape kind read off a
sample with no condition, and where the sample put it."""
import json

import numpy as np
import pytest
from conftest import ROOT

from cnexp.metrics.fidelity import foreground_mask
from cnexp.metrics.shape_kind import drawn_kind
from cnexp.tinyworld import base_check
from cnexp.tinyworld.shapes import SHAPES, Scene, Shape

DIT = ROOT / "assets" / "tinydit"


@pytest.mark.parametrize("kind", SHAPES)
def test_the_drawn_kind_is_read_wherever_and_whatever_size_it_is(kind):
    for cx, cy, r in ((20, 20, 9), (40, 35, 14), (30, 45, 11)):
        scene = Scene("blue", (Shape(kind, "red", cx, cy, r),))
        assert drawn_kind(foreground_mask(np.asarray(scene.target()))) == kind


def test_nothing_drawn_is_no_kind():
    assert drawn_kind(np.zeros((64, 64), bool)) is None


def test_the_largest_shape_decides():
    scene = Scene("blue", (Shape("circle", "red", 20, 20, 14), Shape("square", "red", 50, 50, 6)))
    assert drawn_kind(foreground_mask(np.asarray(scene.target()))) == "circle"


def test_real_images_score_the_ceiling_and_a_mirrored_drawing_scores_low_iou():
    scenes = base_check.one_shape_scenes(24)
    real = [np.asarray(s.target()) for s in scenes]
    assert base_check.score(real, scenes) == {"kind_acc": 1.0, "shape_iou": 1.0}
    # the same kinds (each symmetric left to right), drawn at mirrored places
    mirrored = base_check.score([image[:, ::-1] for image in real], scenes)
    assert mirrored["kind_acc"] == 1.0 and mirrored["shape_iou"] < 0.4


@pytest.mark.skipif(not (DIT / "model_index.json").exists(), reason="assets/tinydit not built")
def test_the_command_samples_the_shipped_transformer_base(tmp_path):
    out = tmp_path / "check.json"
    base_check.main(["base=tiny_dit", "--images", "8", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["real"]["kind_acc"] == 1.0
    assert 0 <= result["sampled"]["kind_acc"] <= 1 and 0 <= result["sampled"]["shape_iou"] < 1


def test_a_swapped_caption_changes_only_the_named_word():
    scene = Scene("red", (Shape("triangle", "black", 30, 30, 10),))
    assert base_check.swapped_caption(scene, "kind") == "a black circle on a red background"
    # the next colour that is not the background's: black wraps round past red to green
    assert base_check.swapped_caption(scene, "colour") == "a green triangle on a red background"


def test_word_sensitivity_reads_both_words_at_three_noise_levels():
    from cnexp.data.check_cli import compose

    change = base_check.word_sensitivity(compose(["base=tiny"]), base_check.one_shape_scenes(4))
    assert list(change)[0] == "text" and len(change) == 4
    for row in change.values():
        assert row["kind"] > 0 and row["colour"] > 0
        assert row["kind/colour"] == pytest.approx(row["kind"] / row["colour"])

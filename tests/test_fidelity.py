"""Control fidelity: each condition type's score behaves at its known extremes."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from cnexp.errors import CnexpError
from cnexp.metrics.fidelity import (CANNY_LOW, CANNY_HIGH, control_fidelity, fidelity_kind,
                                    fidelity_scores)
from cnexp.tinyworld.shapes import scene_at


def as_batch(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) arrays -> (B, 3, H, W) in [0, 1]."""
    return torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255 for a in arrays])


def canny(image: np.ndarray) -> np.ndarray:
    """The canny annotator at the data config's OpenCV thresholds, uint8 (H, W, 3) out."""
    edges = cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), CANNY_LOW, CANNY_HIGH)
    return np.repeat(edges[:, :, None], 3, axis=2)


def scenes(n: int = 4, seed: int = 5):
    picked = [scene_at(seed, i) for i in range(n)]
    targets = [np.asarray(s.target()) for s in picked]
    outlines = [np.asarray(s.condition()) for s in picked]
    return targets, outlines


def test_canny_f1_is_one_for_an_image_whose_edges_are_the_condition():
    targets, _ = scenes()
    conditions = [canny(t) for t in targets]
    assert sum(c.any() for c in conditions) >= 3  # (a grey-equal shape has no edges)
    f1 = fidelity_scores(as_batch(targets), as_batch(conditions), "f1", annotate=canny)["f1"]
    assert f1 == [1.0] * len(targets)
    swapped = fidelity_scores(as_batch(targets), as_batch(conditions[1:] + conditions[:1]),
                              "f1", annotate=canny)["f1"]
    assert max(swapped) < 0.5


def test_canny_f1_with_the_data_modules_annotator():
    annotators = pytest.importorskip("cnexp.data.annotators")
    annotate = annotators.get_annotator("canny", low_threshold=CANNY_LOW, high_threshold=CANNY_HIGH)
    targets, _ = scenes()
    conditions = [annotate(t) for t in targets]
    assert control_fidelity(as_batch(targets), as_batch(conditions), "f1", annotate)["f1"] == 1.0


def test_outline_fidelity_rewards_the_matching_shape():
    targets, outlines = scenes()
    own = control_fidelity(as_batch(targets), as_batch(outlines), "outline")
    other = control_fidelity(as_batch(targets), as_batch(outlines[1:] + outlines[:1]), "outline")
    # the real image of a condition: its Canny edges lie within 1-2 px of the 2 px outline
    assert own["shape_iou"] > 0.9 and own["edge_f1"] > 0.5
    assert other["shape_iou"] < own["shape_iou"] - 0.4 and other["edge_f1"] < own["edge_f1"]


def test_ssim_rmse_miou_at_their_extremes():
    targets, _ = scenes()
    same = as_batch(targets)
    identity = lambda image: image  # noqa: E731  the "annotator" re-detects the image itself
    assert control_fidelity(same, same, "ssim", identity)["ssim"] == pytest.approx(1.0, abs=1e-4)
    assert control_fidelity(same, same, "rmse", identity)["rmse"] == 0.0
    assert control_fidelity(same, same, "miou", identity)["miou"] == 1.0
    shifted = as_batch([np.roll(t, 9, axis=1) for t in targets])
    assert control_fidelity(shifted, same, "miou", identity)["miou"] < 0.9
    assert control_fidelity(shifted, same, "rmse", identity)["rmse"] > 10
    assert control_fidelity(shifted, same, "ssim", identity)["ssim"] < 0.9


def test_fidelity_kind_follows_the_annotator():
    assert fidelity_kind("auto", None) == "outline"
    assert fidelity_kind("auto", "canny") == "f1"
    assert fidelity_kind("auto", "hed") == "ssim"
    assert fidelity_kind("auto", "midas") == "rmse"
    assert fidelity_kind("ssim", "canny") == "ssim"
    with pytest.raises(CnexpError, match="data.annotator"):
        fidelity_kind("f1", None)

"""Control fidelity: does the generated image follow the condition?

ControlNet++ protocol: re-detect the condition on the generated image with the condition's own
annotator and compare it with the input condition. The comparison depends on the condition type:
- f1 (canny, mlsd): binary F1 of the re-detected edges against the condition's, pixel-exact;
- ssim (hed, pidinet, lineart*): SSIM of the grey maps;
- rmse (midas, zoe, leres depth): RMSE on 0-255 (lower is better);
- miou (segmentation maps, colour-coded): mean IoU over the colours present;
- outline (the tiny world, fill50k: no annotator, the condition is a shape's outline):
  edge F1 of the sample's Canny edges within 1 pixel of the outline, shape IoU of the
  sample's foreground (pixels far from its border colour) against the outline's interior, and
  shape-kind accuracy: is each outlined shape drawn as its kind (cnexp/metrics/shape_kind.py).
`FIDELITY` maps each kind to its scorer; `fidelity_kind` picks one from data.annotator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import cv2
import numpy as np
import torch
from scipy import ndimage
from torchmetrics.functional.image import structural_similarity_index_measure

from cnexp.errors import CnexpError
from cnexp.metrics.shape_kind import kind_accuracy

CANNY_LOW, CANNY_HIGH = 100, 200  # OpenCV units, as ControlNet++ (0.1/0.2 on [0, 1] scaled)

Annotate = Callable[[np.ndarray], np.ndarray]  # uint8 (H, W, 3) image -> uint8 (H, W, 3) condition


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.detach().cpu().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


# ---- outline conditions (no annotator) ----------------------------------------------------------
def outline_mask(condition: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 condition -> bool outline pixels."""
    return condition.max(-1) > 127


def foreground_mask(image: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """Pixels whose colour is far from the image's border colour (its background)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    background = np.median(border, axis=0)
    return np.linalg.norm(image.astype(np.float32) - background, axis=-1) > threshold


def edge_f1(image: np.ndarray, condition: np.ndarray) -> float:
    edges = cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), CANNY_LOW, CANNY_HIGH) > 0
    outline = outline_mask(condition)
    if not edges.any() or not outline.any():
        return 0.0
    near = np.ones((3, 3), bool)
    precision = (edges & ndimage.binary_dilation(outline, near)).sum() / edges.sum()
    recall = (outline & ndimage.binary_dilation(edges, near)).sum() / outline.sum()
    return float(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))


def shape_iou(image: np.ndarray, condition: np.ndarray) -> float:
    target = ndimage.binary_fill_holes(outline_mask(condition))
    generated = foreground_mask(image)
    union = (target | generated).sum()
    return float((target & generated).sum() / union) if union else 1.0


def outline_scores(image: np.ndarray, condition: np.ndarray, annotate=None) -> dict[str, float]:
    filled = ndimage.binary_fill_holes(outline_mask(condition))
    return {"shape_iou": shape_iou(image, condition), "edge_f1": edge_f1(image, condition),
            "kind_acc": kind_accuracy(filled, foreground_mask(image))}


# ---- re-detected conditions (ControlNet++) ------------------------------------------------------
def binary_f1(detected: np.ndarray, condition: np.ndarray) -> float:
    """Pixel-exact F1 of two binary maps (uint8 (H, W, 3), on where any channel > 127)."""
    pred, true = detected.max(-1) > 127, condition.max(-1) > 127
    if not pred.any() and not true.any():
        return 1.0
    hits = (pred & true).sum()
    return float(2 * hits / (pred.sum() + true.sum()))


def grey_ssim(detected: np.ndarray, condition: np.ndarray) -> float:
    def grey(a: np.ndarray) -> torch.Tensor:  # (1, 1, H, W) in [0, 1]
        return torch.from_numpy(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)).float()[None, None] / 255
    return float(structural_similarity_index_measure(grey(detected), grey(condition),
                                                     data_range=1.0))


def grey_rmse(detected: np.ndarray, condition: np.ndarray) -> float:
    """RMSE of the grey maps on the 0-255 scale (depth: ControlNet++ reports this)."""
    diff = (cv2.cvtColor(detected, cv2.COLOR_RGB2GRAY).astype(np.float64)
            - cv2.cvtColor(condition, cv2.COLOR_RGB2GRAY))
    return float(np.sqrt(np.mean(diff ** 2)))


def colour_miou(detected: np.ndarray, condition: np.ndarray) -> float:
    """Mean IoU over the classes of two colour-coded segmentation maps (one colour per class)."""
    def codes(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.int64)
        return (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]
    pred, true = codes(detected), codes(condition)
    ious = [((pred == c) & (true == c)).sum() / ((pred == c) | (true == c)).sum()
            for c in np.union1d(np.unique(pred), np.unique(true))]
    return float(np.mean(ious))


def _redetected(compare: Callable[[np.ndarray, np.ndarray], float], name: str):
    def score(image: np.ndarray, condition: np.ndarray, annotate: Optional[Annotate]):
        return {name: compare(annotate(image), condition)}
    return score


@dataclass(frozen=True)
class Fidelity:
    score: Callable[[np.ndarray, np.ndarray, Optional[Annotate]], dict[str, float]]
    metrics: tuple[str, ...]  # the score's keys; the first is the headline that sudden
    higher_is_better: bool = True  # convergence and the run's report follow
    needs_annotator: bool = True

    @property
    def headline(self) -> str:
        return self.metrics[0]


FIDELITY = {
    "outline": Fidelity(outline_scores, ("shape_iou", "edge_f1", "kind_acc"),
                        needs_annotator=False),
    "f1": Fidelity(_redetected(binary_f1, "f1"), ("f1",)),
    "ssim": Fidelity(_redetected(grey_ssim, "ssim"), ("ssim",)),
    "rmse": Fidelity(_redetected(grey_rmse, "rmse"), ("rmse",), higher_is_better=False),
    "miou": Fidelity(_redetected(colour_miou, "miou"), ("miou",)),
}
# data.annotator -> fidelity kind (ControlNet++); annotators not listed fall back to SSIM
ANNOTATOR_FIDELITY = {
    "canny": "f1", "mlsd": "f1",
    "hed": "ssim", "pidinet": "ssim", "lineart": "ssim", "lineart_anime": "ssim",
    "lineart_standard": "ssim",
    "midas": "rmse", "zoe": "rmse", "leres": "rmse",
    "seg": "miou", "segmentation": "miou", "oneformer": "miou", "uniformer": "miou",
}


def fidelity_kind(choice: str, annotator: Optional[str]) -> str:
    """eval.fidelity ("auto" or a kind) + data.annotator -> a key of FIDELITY."""
    if choice == "auto":
        return "outline" if annotator is None else ANNOTATOR_FIDELITY.get(annotator, "ssim")
    if FIDELITY[choice].needs_annotator and annotator is None:
        raise CnexpError(f"eval.fidelity={choice} re-detects the condition on each sample and "
                         "needs data.annotator (e.g. data.annotator=canny); without one use "
                         "eval.fidelity=outline or auto")
    return str(choice)


def fidelity_scores(images: torch.Tensor, conditions: torch.Tensor, kind: str = "outline",
                    annotate: Optional[Annotate] = None) -> dict[str, list[float]]:
    """Per-image scores of samples against their conditions (both (B, 3, H, W) in [0, 1])."""
    fidelity = FIDELITY[kind]
    if fidelity.needs_annotator and annotate is None:
        raise ValueError(f"fidelity {kind!r} needs an annotator to re-detect the condition")
    rows = [fidelity.score(i, c, annotate)
            for i, c in zip(_to_uint8(images), _to_uint8(conditions))]
    return {name: [row[name] for row in rows] for name in rows[0]} if rows else {}


def control_fidelity(images: torch.Tensor, conditions: torch.Tensor, kind: str = "outline",
                     annotate: Optional[Annotate] = None) -> dict[str, float]:
    """Mean scores over a batch (see fidelity_scores)."""
    return {k: float(np.mean(v)) for k, v in
            fidelity_scores(images, conditions, kind, annotate).items()}

"""Control fidelity: does the generated image follow the condition?

ControlNet++ protocol: re-detect the condition on the generated image and compare it with the
input condition. For outline conditions (the tiny world, fill50k) two numbers:
- edge F1: Canny edges of the sample vs the condition's outline, matched within 1 pixel;
- shape IoU: the sample's foreground (pixels far from its border colour) vs the outline's interior.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from scipy import ndimage

CANNY_LOW, CANNY_HIGH = 100, 200  # OpenCV units, as ControlNet++ (0.1/0.2 on [0, 1] scaled)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.detach().cpu().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


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


def control_fidelity(images: torch.Tensor, conditions: torch.Tensor) -> dict[str, float]:
    """Mean edge F1 and shape IoU over a batch of samples and their conditions (both in [0, 1])."""
    imgs, conds = _to_uint8(images), _to_uint8(conditions)
    return {"edge_f1": float(np.mean([edge_f1(i, c) for i, c in zip(imgs, conds)])),
            "shape_iou": float(np.mean([shape_iou(i, c) for i, c in zip(imgs, conds)]))}

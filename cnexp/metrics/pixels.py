"""Samples as pixels: the one conversion every sample metric and the grids share."""
import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> uint8, rounded as a PNG writer would."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)

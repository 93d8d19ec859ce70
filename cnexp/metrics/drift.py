"""Copy drift: how far the trainable copy has moved from the pretrained weights it started as.

The paper's case for zero convolutions is that they keep harmful early gradients from damaging
the copy's pretrained features. This measures that damage directly, as the relative distance
||theta - theta_base|| / ||theta_base|| over every parameter the branch copied from the frozen
UNet (cnexp/control/branch.py: Branch.copied_from_base). 0 at step 0 for the copy; not defined
for branches that copy nothing (lite, scratch, XS).
"""
from __future__ import annotations

from typing import Optional

import torch


@torch.no_grad()
def copy_drift(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Optional[float]:
    """Relative L2 distance of the parameters from their base weights; None without pairs."""
    if not pairs:
        return None
    moved = base = torch.zeros((), dtype=torch.float64)
    for param, start in pairs.values():
        start = start.detach().to(param.device, torch.float64)
        moved = moved + (param.detach().double() - start).pow(2).sum().cpu()
        base = base + start.pow(2).sum().cpu()
    return float(moved.sqrt() / base.sqrt().clamp_min(1e-12))

"""Copy drift: how far the trainable copy has moved from the pretrained weights it started as.

The paper's case for zero convolutions is that they keep harmful early gradients from damaging
the copy's pretrained features. This measures that damage directly, as the relative distance
||theta - theta_base|| / ||theta_base|| over every parameter the branch copied from the frozen
UNet (cnexp/control/branch.py: Branch.copied_from_base). 0 at step 0 for the copy, whatever
dtype the base is stored in (cnexp/precision.py store_frozen); not defined for branches that
copy nothing (lite, scratch, XS).

Cost: one pass over the copy in its own dtype (fp32), one tensor at a time; only the per-tensor
sums of squares (one number per tensor) are added in float64, and the frozen base's norm is
taken once per run (CopyDrift). Within 1e-6 of the former all-float64 formula (tests/test_drift.py).
"""
from __future__ import annotations

from typing import Optional

import torch

Pairs = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _total(sums: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor fp32 sums added in float64 (one number per tensor, not per weight)."""
    return torch.stack(sums).double().sum()


@torch.no_grad()
def moved_sq(pairs: Pairs) -> torch.Tensor:
    """||theta - theta_base||^2 (float64, on the copy's device). The difference is taken in the
    copy's dtype, one tensor at a time: fp32 - fp32 rounds once per weight (relative 6e-8),
    fp32 - bf16 promotes the base exactly. (square().sum(), not vector_norm: a CPU's fp32 norm
    is off by ~1e-6, the summation ~1e-7.)"""
    return _total([(param.detach() - start).square_().sum() for param, start in pairs.values()])


@torch.no_grad()
def base_sq(pairs: Pairs) -> torch.Tensor:
    """||theta_base||^2 (float64), each tensor summed in fp32 (a half base upcast per tensor)."""
    return _total([start.float().square().sum() for _, start in pairs.values()])


def copy_drift(pairs: Pairs, base: Optional[torch.Tensor] = None) -> Optional[float]:
    """Relative L2 distance of the parameters from their base weights; None without pairs.
    base: base_sq(pairs) if the caller keeps it (the base is frozen), else computed here."""
    if not pairs:
        return None
    base = base_sq(pairs) if base is None else base
    moved = moved_sq(pairs).to(base.device)
    return float(moved.sqrt() / base.sqrt().clamp_min(1e-12))  # the one host read


class CopyDrift:
    """copy_drift at every evaluation of a run, the frozen base's norm computed once. Taken
    again if the base tensors are replaced or written in place (their storage or version)."""

    def __init__(self):
        self._key: Optional[tuple] = None
        self._base: Optional[torch.Tensor] = None

    def __call__(self, pairs: Pairs) -> Optional[float]:
        if not pairs:
            return None
        key = tuple((start.data_ptr(), start._version, start.dtype) for _, start in pairs.values())
        if key != self._key:
            self._key, self._base = key, base_sq(pairs)
        return copy_drift(pairs, self._base)

"""Cutting the splits a source lacks from its train split: deterministic, and by content group.

A group is every sample with the same decoded content (cnexp/data/check.py); a whole group lands
in one split, so no held-out sample is also a training sample. Without duplicates each group is
one sample and the split is exactly the per-sample one (the same seed gives the same split as
before groups existed).
"""
from __future__ import annotations

import torch

from cnexp.data.images import DataError


def split_indices(n: int, seed: int, val_fraction: float = 0.05,
                  test_fraction: float = 0.05) -> dict[str, list[int]]:
    """Deterministic train/val/test split of a source that has none (same seed, same split).
    A fraction of 0 gives an empty split; any other at least one sample."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, int(n * test_fraction)) if test_fraction > 0 else 0
    return {"val": sorted(order[:n_val]), "test": sorted(order[n_val:n_val + n_test]),
            "train": sorted(order[n_val + n_test:])}


def split_groups(groups: list[list[int]], seed: int, val_fraction: float,
                 test_fraction: float) -> dict[str, list[int]]:
    """split_indices over groups (ordered by their first member), each expanded to its members.
    Singleton groups [0], [1], ... give exactly split_indices(n, ...)."""
    groups = sorted(groups, key=lambda members: members[0])
    cut = split_indices(len(groups), seed, val_fraction, test_fraction)
    return {split: sorted(i for g in chosen for i in groups[g]) for split, chosen in cut.items()}


def keep_families_together(cut: dict[str, list[int]], families: list[list[int]]
                           ) -> dict[str, list[int]]:
    """`cut` with each family (near-duplicates: cnexp/data/near_duplicates.py) moved whole to the
    split of its lowest member; every other sample stays where it was."""
    side = {i: split for split, members in cut.items() for i in members}
    for family in families:
        home = side[min(family)]
        for i in family:
            side[i] = home
    return {split: sorted(i for i, s in side.items() if s == split) for split in cut}


def too_small(root: str, n: int, missing: list[str], unit: str = "sample") -> DataError:
    """The message for a root with fewer samples (or content groups) than splits to cut."""
    cuts = " and a ".join("validation" if s == "val" else s for s in missing)
    fix = "add samples"
    if "test" in missing:
        k = len(missing)
        fix += f", or set data.test_fraction=0 (then {k} {'is' if k == 1 else 'are'} enough)"
    return DataError(f"data.root '{root}' holds {n} {unit}{'s' * (n != 1)}: too few "
                     f"to cut a {cuts} split from (data.val_fraction, data.test_fraction: at "
                     "least one sample each) and keep one for training; it needs at least "
                     f"{len(missing) + 1} (one per split): {fix}")

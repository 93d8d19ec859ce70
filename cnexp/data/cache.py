"""Computed conditions on disk, keyed by image content, annotator and its parameters.

Layout: <directory>/<annotator key>/<sha1 of the pixels>.png, plus params.json saying what the
key means. The key is the resized image's pixels (not its path), so a renamed or re-encoded copy
still hits and an edited image misses. Writes are atomic (temp file + rename), so data-loader
workers racing on one sample and a run killed mid-write leave no half-written condition.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from cnexp.data.annotators import Annotator
from cnexp.fileio import AtomicFile, atomic_write


class ConditionCache:
    """annotate(image) through a disk cache; `hits` and `computed` count this process's calls."""

    def __init__(self, annotator: Annotator, directory: str | Path | None):
        self.annotator = annotator
        self.directory = Path(directory) / annotator.key if directory else None
        self.hits = self.computed = 0
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            meta = {"annotator": annotator.name, "seed": annotator.seed, **annotator.params}
            atomic_write(self.directory / "params.json", json.dumps(meta, sort_keys=True) + "\n")

    def path_for(self, image: np.ndarray) -> Path | None:
        if self.directory is None:
            return None
        digest = hashlib.sha1(str(image.shape).encode() + image.tobytes()).hexdigest()
        return self.directory / f"{digest}.png"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) image -> uint8 (H, W, 3) condition."""
        path = self.path_for(image)
        if path is not None and path.exists():
            try:
                with Image.open(path) as cached:
                    condition = np.array(cached.convert("RGB"))
                if condition.shape == image.shape:
                    self.hits += 1
                    return condition
            except OSError:
                pass  # unreadable entry: recompute and overwrite it
        condition = self.annotator(image)
        self.computed += 1
        if path is not None:
            with AtomicFile(path) as f:
                Image.fromarray(condition).save(f, format="PNG")
        return condition

    def summary(self) -> str:
        where = self.directory if self.directory is not None else "memory only"
        return (f"condition cache ({self.annotator.name}, {where}): {self.hits} hits, "
                f"{self.computed} computed")

"""The authors' fill50k layout: prompt.json (one JSON object per line) + the images it names."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cnexp.errors import CnexpError

REQUIRED_KEYS = ("source", "target", "prompt")


class DataError(CnexpError):
    pass


def read_index(root: Path) -> list[dict]:
    """Parse root/prompt.json; each bad line is reported with its number and the fix."""
    index = Path(root) / "prompt.json"
    if not Path(root).is_dir():
        raise DataError(f"data.root '{root}' does not exist: point data.root at a directory "
                        "holding prompt.json (fill50k layout)")
    if not index.exists():
        raise DataError(f"{index} is missing: a fill50k root needs prompt.json with one JSON "
                        "object per line with keys source, target, prompt")
    records = []
    for number, line in enumerate(index.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{index}:{number} is not JSON ({err.msg}): each line must be one "
                            'object like {"source": ..., "target": ..., "prompt": ...}') from None
        missing = [k for k in REQUIRED_KEYS if k not in record]
        if missing:
            raise DataError(f"{index}:{number} lacks key(s) {missing}: each line needs "
                            f"{list(REQUIRED_KEYS)}")
        records.append(record)
    if not records:
        raise DataError(f"{index} holds no samples")
    return records


def load_rgb(path: Path, resolution: int) -> np.ndarray:
    """RGB uint8 (H, W, 3): grey/RGBA converted, shorter side resized, then center-cropped."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image file {path} is missing (named in prompt.json)") from None
    except OSError as err:
        raise DataError(f"image file {path} is corrupt or not an image ({err})") from None
    w, h = img.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                         Image.BICUBIC)
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    return np.array(img)  # writable copy for torch.from_numpy


class Fill50kDataset(Dataset):
    """(condition in [0,1], image in [-1,1], caption) triples from one fill50k root."""

    def __init__(self, root: str | Path, resolution: int, indices: list[int] | None = None):
        self.root = Path(root)
        self.records = read_index(self.root)
        self.indices = list(range(len(self.records))) if indices is None else indices
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        record = self.records[self.indices[i]]
        cond = load_rgb(self.root / record["source"], self.resolution)
        image = load_rgb(self.root / record["target"], self.resolution)
        return {
            "condition": torch.from_numpy(cond).permute(2, 0, 1).float() / 255.0,  # (3, H, W)
            "image": torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0,  # (3, H, W)
            "caption": record["prompt"],
            "index": self.indices[i],
        }

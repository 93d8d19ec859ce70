"""The authors' fill50k layout: prompt.json (one JSON object per line) + the images it names.

    {"source": "source/0.png", "target": "target/0.png", "prompt": "pale golden rod circle ..."}

`source` is the condition, `target` the image, `prompt` the caption (or a list of captions).
The tiny world's generator writes this layout too.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from PIL import Image

from cnexp.data.dataset import TriplesDataset
from cnexp.data.images import (DataError, Sample, caption_list, file_stamps, image_size,
                               open_rgb, path_in_root, read_text)
from cnexp.data.layout import SPLITS, DataLayout, register
from cnexp.knobs import ConditionStyle

__all__ = ["DataError", "Fill50kDataset", "Fill50kSource", "read_index"]

REQUIRED_KEYS = ("source", "target", "prompt")


def _check_root(root: Path) -> Path:
    if not root.is_dir():
        raise DataError(f"data.root '{root}' does not exist: point data.root at a directory "
                        "holding prompt.json (fill50k layout)")
    index = root / "prompt.json"
    if not index.exists():
        raise DataError(f"{index} is missing: a fill50k root needs prompt.json with one JSON "
                        "object per line with keys source, target, prompt")
    return index


def read_numbered_index(root: Path, need_source: bool = True) -> list[tuple[int, dict]]:
    """(line number, record) for each line of root/prompt.json; a bad line is named with the fix.
    need_source=False: `source` may be absent (the condition is computed by an annotator)."""
    index = _check_root(Path(root))
    required = REQUIRED_KEYS if need_source else ("target", "prompt")
    records = []
    # "\n" only: str.splitlines would also split at U+2028 and other separators inside a caption
    for number, line in enumerate(read_text(index).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{index}:{number} is not JSON ({err.msg}): each line must be one "
                            'object like {"source": ..., "target": ..., "prompt": ...}') from None
        if not isinstance(record, dict):
            raise DataError(f"{index}:{number} is not a JSON object: each line must be one "
                            'object like {"source": ..., "target": ..., "prompt": ...}')
        missing = [k for k in required if k not in record]
        if missing:
            raise DataError(f"{index}:{number} lacks key(s) {missing}: each line needs "
                            f"{list(required)}")
        for key in ("source", "target") if need_source else ("target",):
            path_in_root(index.parent, record[key], f"{index}:{number}", f"'{key}'")
        records.append((number, record))
    if not records:
        raise DataError(f"{index} holds no samples: add one JSON object per line")
    return records


def read_index(root: Path) -> list[dict]:
    """The records of root/prompt.json, in file order."""
    return [record for _, record in read_numbered_index(root)]


class Fill50kSource:
    """Raw samples of one fill50k root; with_condition=False ignores `source` (annotated)."""

    def __init__(self, root: str | Path, with_condition: bool = True):
        self.root, self.with_condition = Path(root), with_condition
        self.records = read_numbered_index(self.root, need_source=with_condition)

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> Sample:
        number, record = self.records[index]
        where = f"{self.root / 'prompt.json'}:{number}"
        image = open_rgb(self.root / record["target"], origin=f"'target' of {where}")
        condition = (open_rgb(self.root / record["source"], origin=f"'source' of {where}",
                              condition=True) if self.with_condition else None)
        return Sample(image, condition, self.captions(index), where)

    def load_image(self, index: int) -> Sample:
        """The image and captions; the condition is not decoded (the encoder cache's fill)."""
        number, record = self.records[index]
        where = f"{self.root / 'prompt.json'}:{number}"
        image = open_rgb(self.root / record["target"], origin=f"'target' of {where}")
        return Sample(image, None, self.captions(index), where)

    def load_condition(self, index: int) -> tuple[Image.Image, tuple[int, int], str]:
        """The condition, the image's (width, height) read from its header, and where the sample
        comes from: training from cached latents never decodes the image."""
        number, record = self.records[index]
        where = f"{self.root / 'prompt.json'}:{number}"
        size = image_size(self.root / record["target"], origin=f"'target' of {where}")
        return (open_rgb(self.root / record["source"], origin=f"'source' of {where}",
                         condition=True), size, where)

    def captions(self, index: int) -> list[str]:
        number, record = self.records[index]
        return caption_list(record["prompt"], f"{self.root / 'prompt.json'}:{number}", "'prompt'")


    def fingerprint(self) -> str:
        """prompt.json's bytes (captions, file names) and each image file's size and mtime;
        the conditions are left out: no frozen encoder sees them."""
        index = (self.root / "prompt.json").read_bytes()
        stamps = file_stamps(self.root, [record["target"] for _, record in self.records])
        return hashlib.sha1(index + json.dumps(stamps).encode()).hexdigest()

    def content_fingerprint(self) -> str:
        """fingerprint() and the condition files too: what the data check's scan depends on."""
        names = [record["source"] for _, record in self.records] if self.with_condition else []
        stamps = json.dumps(file_stamps(self.root, names)).encode()
        return hashlib.sha1(self.fingerprint().encode() + stamps).hexdigest()

    def files(self, index: int) -> list[str]:
        """The files the entry names (normalised): the same files twice is a repeated entry."""
        _, record = self.records[index]
        keys = ("target", "source") if self.with_condition else ("target",)
        return [os.path.normpath(record[k]) for k in keys]

    def name(self, index: int) -> str:
        """The sample's target file and index line, for messages that list samples."""
        number, record = self.records[index]
        return f"{self.root / record['target']} ({self.root / 'prompt.json'}:{number})"


class Fill50kDataset(TriplesDataset):
    """(condition in [0,1], image in [-1,1], caption) triples from one fill50k root."""

    def __init__(self, root: str | Path, resolution: int, indices: list[int] | None = None):
        super().__init__(Fill50kSource(root), resolution, indices)


@register
class Fill50kLayout(DataLayout):
    """data.layout=fill50k: one root, or train/ val/ test/ sub-roots each with its prompt.json."""
    name = "fill50k"
    condition_styles = tuple(s.value for s in ConditionStyle)  # cnexp/tinyworld/styles.py

    def open_sources(self, cfg, cache_dir):
        from cnexp.tinyworld.styles import restyle_sources

        root, with_condition = Path(cfg.root), cfg.annotator is None
        if all((root / s / "prompt.json").exists() for s in SPLITS):
            sources = {s: Fill50kSource(root / s, with_condition) for s in SPLITS}
        else:
            sources = {"train": Fill50kSource(root, with_condition)}
        return restyle_sources(sources, cfg)

"""Images + captions only: the condition is computed from each image by an annotator.

Captions come from, in order of preference:
- root/metadata.jsonl: one object per line, `file_name` plus the caption column (a string or a
  list of strings);
- root/metadata.csv: a header with `file_name` and the caption column;
- a `.txt` sidecar next to each image (one caption per non-empty line); none: empty caption.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

from cnexp.data.images import (IMAGE_SUFFIXES, DataError, Sample, caption_list, file_stamps,
                               open_rgb, path_in_root, read_text)
from cnexp.data.layout import DataLayout, register


def _check_column(record: dict, column: str, where: str) -> None:
    if column not in record:
        raise DataError(f"{where} has no caption column '{column}'; available columns: "
                        f"{[k for k in record if k != 'file_name']}. Set data.caption_column "
                        "to one of them")


def _read_jsonl(path: Path, column: str) -> list[tuple[str, list[str], str]]:
    entries = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where} is not JSON ({err.msg}): each line must be one object "
                            f'like {{"file_name": "0.png", "{column}": "a caption"}}') from None
        if not isinstance(record, dict) or "file_name" not in record:
            raise DataError(f"{where} lacks key 'file_name': each line names its image file")
        _check_column(record, column, where)
        captions = caption_list(record[column], where, f"column '{column}'")
        path_in_root(path.parent, record["file_name"], where, "'file_name'")
        entries.append((record["file_name"], captions, where))
    return entries


def _read_csv(path: Path, column: str) -> list[tuple[str, list[str], str]]:
    rows = list(csv.DictReader(io.StringIO(read_text(path), newline="")))
    entries = []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{path}:{number}"
        if not row.get("file_name"):
            raise DataError(f"{where} has no 'file_name': the header must name a file_name "
                            f"column (it has {list(row)})")
        _check_column(row, column, where)
        path_in_root(path.parent, row["file_name"], where, "'file_name'")
        entries.append((row["file_name"], [row[column] or ""], where))
    return entries


def _read_sidecars(root: Path, exclude: Path | None) -> list[tuple[str, list[str], str]]:
    root, entries = root.resolve(), []
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        if exclude is not None and image.is_relative_to(exclude):
            continue  # e.g. the condition cache, when it lives inside the image folder
        sidecar = image.with_suffix(".txt")
        captions = ([c.strip() for c in read_text(sidecar).splitlines() if c.strip()]
                    if sidecar.exists() else [])
        entries.append((str(image.relative_to(root)), captions or [""], str(image)))
    return entries


class CaptionsSource:
    """Raw samples (image, no condition, captions) of an images + captions folder."""

    def __init__(self, root: str | Path, caption_column: str = "text",
                 exclude: str | Path | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data.root '{root}' does not exist: point it at a folder of images "
                            "with .txt captions or a metadata.jsonl/metadata.csv")
        if (self.root / "metadata.jsonl").exists():
            self.entries = _read_jsonl(self.root / "metadata.jsonl", caption_column)
        elif (self.root / "metadata.csv").exists():
            self.entries = _read_csv(self.root / "metadata.csv", caption_column)
        else:
            self.entries = _read_sidecars(self.root, Path(exclude).resolve() if exclude else None)
        if not self.entries:
            raise DataError(f"data.root '{root}' holds no images ({', '.join(IMAGE_SUFFIXES)}) "
                            "and no metadata.jsonl/metadata.csv naming any")

    def __len__(self) -> int:
        return len(self.entries)

    def fingerprint(self) -> str:
        """Each entry's file name and captions, and its image file's size and mtime."""
        stamps = file_stamps(self.root, [name for name, _, _ in self.entries])
        captions = [captions for _, captions, _ in self.entries]
        return hashlib.sha1(json.dumps([stamps, captions]).encode()).hexdigest()

    def load(self, index: int) -> Sample:
        file_name, captions, where = self.entries[index]
        return Sample(open_rgb(self.root / file_name, origin=where), None, captions, where)

    def captions(self, index: int) -> list[str]:
        return self.entries[index][1]

    def files(self, index: int) -> list[str]:
        return [os.path.normpath(self.entries[index][0])]

    def name(self, index: int) -> str:
        file_name, _, where = self.entries[index]
        path = str(self.root / file_name)
        return path if where == str((self.root / file_name).resolve()) else f"{path} ({where})"


@register
class CaptionsLayout(DataLayout):
    """data.layout=captions: one train split of images + captions, conditions annotated."""
    name = "captions"

    def check(self, cfg):
        if cfg.annotator is None:
            raise DataError("data.layout=captions computes each condition from its image: set "
                            "data.annotator (offline: canny, content_shuffle, lineart_standard, "
                            "mediapipe_face)")

    def open_sources(self, cfg, cache_dir):
        return {"train": CaptionsSource(cfg.root, cfg.caption_column, exclude=cache_dir)}

"""Hugging Face `datasets` layouts: a save_to_disk directory, parquet files, an imagefolder with
metadata.jsonl/csv (`file_name`, `conditioning_image_file_name`, `text`), or a hub dataset id.

Column names default to diffusers' train_controlnet.py (image, conditioning_image, text). Image
columns are read undecoded and decoded here, so a corrupt image names its row and column.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from PIL import Image

from cnexp.data.images import (DataError, Sample, image_size, open_rgb, path_in_root,
                               to_rgb)
from cnexp.data.layout import DataLayout, register

log = logging.getLogger("cnexp")

# the source's split name -> ours
SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val",
               "test": "test"}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("data.layout=hf needs the `datasets` package: pip install datasets "
                        "(or pip install -e .)") from None
    return datasets


def _kind(root: str) -> str:
    """Which of the four sources `root` names."""
    path = Path(root)
    if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "state.json")):
        return "save_to_disk directory"
    if path.is_file() and path.suffix == ".parquet":
        return "parquet file"
    if path.is_dir():
        has_metadata = any((path / m).exists() for m in METADATA_FILES)
        return ("parquet directory" if not has_metadata and next(path.rglob("*.parquet"), None)
                else "imagefolder")
    if HUB_ID.match(root) and not root.startswith((".", "/")):
        return "hub dataset"
    raise DataError(f"data.root '{root}' does not exist: point it at a save_to_disk directory, "
                    "parquet file(s), an imagefolder with metadata.jsonl, or a hub dataset id "
                    "(owner/name) when online")


def load_hf_splits(root: str, config_name: str | None, cache_dir: str | None) -> dict:
    """Our split name -> datasets.Dataset, for whichever of the four sources `root` is."""
    datasets = _import_datasets()
    kind = _kind(root)
    kwargs = {"cache_dir": cache_dir} if cache_dir else {}
    try:
        if kind == "save_to_disk directory":
            loaded = datasets.load_from_disk(root)
        elif kind == "parquet file":
            loaded = datasets.load_dataset("parquet", data_files=root, **kwargs)
        elif kind == "parquet directory":
            loaded = datasets.load_dataset("parquet", data_dir=root, **kwargs)
        elif kind == "imagefolder":
            loaded = datasets.load_dataset("imagefolder", data_dir=root, **kwargs)
        else:
            loaded = datasets.load_dataset(root, config_name, **kwargs)
    except Exception as err:  # datasets raises many types; each means "this root is not usable"
        first = str(err).splitlines()[0] if str(err) else ""
        raise DataError(f"data.root '{root}' could not be read as a Hugging Face dataset "
                        f"({type(err).__name__}: {first}). For a hub id, be online (or have "
                        "it cached); for a directory, check its files") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = {"train": loaded}
    splits = {SPLIT_NAMES[name]: table for name, table in loaded.items() if name in SPLIT_NAMES}
    if not splits and len(loaded) == 1:  # one split with another name: treat it as train
        splits = {"train": next(iter(loaded.values()))}
    if "train" not in splits:
        raise DataError(f"data.root '{root}' ({kind}) has splits {list(loaded)}; cnexp needs "
                        f"one named train (and optionally validation, test)")
    log.info("data: %s %s, splits %s", kind, root, {k: len(v) for k, v in splits.items()})
    return splits


class HFSource:
    """Raw samples from one split of a `datasets.Dataset`."""

    def __init__(self, table, root: str, split: str, image_column: str,
                 conditioning_column: str | None, caption_column: str):
        datasets = _import_datasets()
        self.root, self.split = root, split
        available = list(table.column_names)
        wanted = {"data.image_column": image_column, "data.caption_column": caption_column}
        if conditioning_column is not None:
            wanted["data.conditioning_image_column"] = conditioning_column
        for field, column in wanted.items():
            if column not in available:
                hint = (" (or set data.annotator, e.g. canny, to compute conditions from the "
                        "images)" if field == "data.conditioning_image_column" else "")
                raise DataError(f"{field}='{column}' is not a column of '{root}' (split {split}); "
                                f"available columns: {available}. Set {field} to one of them"
                                f"{hint}")
        self.columns = (image_column, conditioning_column, caption_column)
        for column in (image_column, conditioning_column):
            if column and isinstance(table.features[column], datasets.Image):
                table = table.cast_column(column, datasets.Image(decode=False))
        self.table = table.select_columns([c for c in self.columns if c])
        self.base = Path(root) if Path(root).is_dir() else Path(root).parent
        self._captions: list | None = None

    def __len__(self) -> int:
        return len(self.table)

    def fingerprint(self) -> str:
        """datasets' own fingerprint of the table (it hashes the data files), and its columns."""
        return f"{self.table._fingerprint}:{self.columns}:{self.split}"

    def _image(self, value, where: str, condition: bool = False) -> Image.Image:
        if isinstance(value, Image.Image):
            return to_rgb(value, where, condition)
        if isinstance(value, dict) and value.get("bytes"):
            return open_rgb(value["bytes"], where, condition)
        path = value.get("path") if isinstance(value, dict) else value
        if isinstance(path, str) and path:
            return open_rgb(self._path(path, where), where, condition)
        raise DataError(f"{where} holds {type(value).__name__}, not an image (bytes, path or "
                        "PIL image): pick an image column")

    def _path(self, path: str, where: str) -> Path:
        """A path in a local data set must stay inside it (a hub data set's rows point into
        the datasets cache, wherever that is)."""
        if Path(self.root).exists():
            return path_in_root(self.base, path, where, "the image path")
        return self.base / path

    def load(self, index: int) -> Sample:
        image_column, conditioning_column, caption_column = self.columns
        row = self.table[index]
        where = f"'{self.root}' split {self.split} row {index}"
        image = self._image(row[image_column], f"{where} column '{image_column}'")
        condition = (self._image(row[conditioning_column], f"{where} column "
                                 f"'{conditioning_column}'", condition=True)
                     if conditioning_column else None)
        return Sample(image, condition, _captions(row[caption_column]), where)

    def load_condition(self, index: int) -> tuple[Image.Image, tuple[int, int], str]:
        """The condition and the image's (width, height) from its header (training from cached
        latents never decodes the image)."""
        image_column, conditioning_column, _ = self.columns
        row = self.table[index]
        where = f"'{self.root}' split {self.split} row {index}"
        value, image_where = row[image_column], f"{where} column '{image_column}'"
        if isinstance(value, Image.Image):
            size = to_rgb(value, image_where).size
        elif isinstance(value, dict) and value.get("bytes"):
            size = image_size(value["bytes"], image_where)
        else:
            path = value.get("path") if isinstance(value, dict) else value
            if not (isinstance(path, str) and path):
                self._image(value, image_where)  # raises the not-an-image error
            size = image_size(self._path(path, image_where), image_where)
        condition = self._image(row[conditioning_column], f"{where} column "
                                f"'{conditioning_column}'", condition=True)
        return condition, size, where

    def name(self, index: int) -> str:
        return f"'{self.root}' split {self.split} row {index}"

    def captions(self, index: int) -> list[str]:
        if self._captions is None:  # the caption column alone, without decoding any image
            self._captions = list(self.table[self.columns[2]])
        return _captions(self._captions[index])


def _captions(text) -> list[str]:
    captions = ([text] if isinstance(text, str) else
                [c for c in text if isinstance(c, str)] if isinstance(text, list) else [])
    return captions or [""]


@register
class HFLayout(DataLayout):
    """data.layout=hf: the splits the `datasets` source has, read through datasets' cache."""
    name = "hf"

    def open_sources(self, cfg, cache_dir):
        tables = load_hf_splits(cfg.root, cfg.hf_config,
                                str(Path(cache_dir) / "hf") if cache_dir else None)
        conditioning = cfg.conditioning_image_column if cfg.annotator is None else None
        return {s: HFSource(t, cfg.root, s, cfg.image_column, conditioning, cfg.caption_column)
                for s, t in tables.items()}

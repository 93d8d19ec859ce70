"""The one map-style dataset of triples, over any layout's source of raw samples."""
from __future__ import annotations

import hashlib
import json
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cnexp.data.cache import ConditionCache
from cnexp.data.images import (DataError, Sample, UnreadableImage, crop_box, match_sizes,
                               resize_shorter)


class Source(Protocol):
    """A layout's reader: raw samples by index. Readers check their index on construction and
    raise DataError naming file/line/field; `load` raises DataError for an unreadable sample."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> Sample: ...

    # optional, to skip a decode (else `load`): image + captions without the condition (the
    # encoder cache's fill), and (condition, the image's (w, h), origin) without the image
    def load_image(self, index: int) -> Sample: ...

    def load_condition(self, index: int) -> tuple[Image.Image, tuple[int, int], str]: ...

    def captions(self, index: int) -> list[str]: ...  # without decoding the images
    def fingerprint(self) -> str: ...  # changes when any sample's file or caption changes


class TriplesDataset(Dataset):
    """Items {"condition": (3, R, R) in [0, 1], "image": (3, R, R) in [-1, 1], "caption": str,
    "index": int (the sample's index in its source)}; a dict so later stages may add keys.

    Training items pick a random caption and, with random_crop, a random crop, drawn from torch's
    RNG: seeded by seed_everything in the main process and by the DataLoader's generator in its
    workers, so an epoch is reproducible. Evaluation items (train=False) are a pure function of
    the index: first caption, center crop.

    `latents_cached` (set by the datamodule when the frozen-encoder cache holds every training
    image's latents): items carry an empty "image" and, where the source can read the condition
    alone (load_condition) and no annotator needs the image, the target image is not decoded.
    `conditions_cached` (the cache holds the conditions' latents too: SD3, Flux): items carry an
    empty "condition" as well, and nothing is decoded.
    """

    def __init__(self, source: Source, resolution: int, indices: list[int] | None = None,
                 train: bool = False, random_crop: bool = False,
                 conditions: ConditionCache | None = None):
        self.source, self.resolution = source, resolution
        self.indices = list(range(len(source))) if indices is None else list(indices)
        self.train, self.random_crop, self.conditions = train, random_crop, conditions
        self.latents_cached = self.conditions_cached = False

    def __len__(self) -> int:
        return len(self.indices)

    def load_arrays(self, index: int) -> tuple[np.ndarray, np.ndarray, Sample]:
        """Image and condition as uint8 (H, W, 3), shorter side = resolution, not yet cropped."""
        sample = self.source.load(index)
        image = resize_shorter(sample.image, self.resolution)
        if self.conditions is not None:  # computed from the image (and cached)
            condition = self.conditions(image)
        elif sample.condition is None:
            raise DataError(f"{sample.origin} has no condition: set data.annotator (e.g. canny) "
                            "to compute conditions from the images")
        else:
            condition = resize_shorter(match_sizes(sample.image, sample.condition, sample.origin),
                                       self.resolution)
        return image, condition, sample

    def _condition_alone(self, index: int) -> tuple[np.ndarray, list[str]] | None:
        """The resized condition and the captions without decoding the image, where possible."""
        load = getattr(self.source, "load_condition", None)
        if load is None or self.conditions is not None:  # an annotator needs the image
            return None
        condition, size, origin = load(index)
        condition = resize_shorter(match_sizes(size, condition, origin), self.resolution)
        return condition, self.source.captions(index) or [""]

    def __getitem__(self, i: int) -> dict:
        return self.item_and_captions(i)[0]

    def item_and_captions(self, i: int) -> tuple[dict, list[str]]:
        """Item i and all of its sample's captions."""
        index = self.indices[i]
        if self.latents_cached and self.conditions_cached and not self.random_crop:
            return self._captions_only(index)
        alone = self._condition_alone(index) if self.latents_cached else None
        if alone is None:
            image, condition, sample = self.load_arrays(index)
            captions = sample.captions or [""]
        else:
            (condition, captions), image = alone, None
        offset = tuple(torch.rand(2).tolist()) if self.train and self.random_crop else None
        top, left = crop_box(*condition.shape[:2], self.resolution, offset)  # the image's shape
        window = (slice(top, top + self.resolution), slice(left, left + self.resolution))
        pick = int(torch.randint(len(captions), ())) if self.train and len(captions) > 1 else 0
        item = {
            "condition": _to_tensor(condition[window]).div_(255.0),  # the image's pixels
            # cached latents stand for the image: an empty tensor keeps the batch's keys
            "image": (torch.empty(0) if self.latents_cached
                      else _to_tensor(image[window]).div_(127.5).sub_(1.0)),
            "caption": captions[pick],
            "index": index,
        }
        reference = getattr(self.source, "reference_condition", None)
        if reference is not None and not self.train:  # a restyled condition (tinyworld/styles.py):
            outline = resize_shorter(reference(index), self.resolution)  # fidelity scores this
            item["outline"] = _to_tensor(outline[window]).div_(255.0)
        return item, captions

    def _captions_only(self, index: int) -> tuple[dict, list[str]]:
        """An item whose image and condition both stand as cached latents: nothing decoded."""
        captions = self.source.captions(index) or [""]
        pick = int(torch.randint(len(captions), ())) if self.train and len(captions) > 1 else 0
        return {"condition": torch.empty(0), "image": torch.empty(0), "caption": captions[pick],
                "index": index}, captions

    def fill_item(self, i: int, image: bool = True, condition: bool = False) -> dict:
        """What the frozen-encoder cache's fill encodes of item i: the image (unless image=False)
        and the condition (if condition=True) as training sees them uncached (center crop), and
        all captions; no random number is drawn."""
        index = self.indices[i]
        item = {"index": index}
        if condition:
            alone = self._condition_alone(index)
            pixels = alone[0] if alone is not None else self.load_arrays(index)[1]
            item["condition"] = _to_tensor(_center(pixels, self.resolution)).div_(255.0)
        if not image:
            return {**item, "captions": self.source.captions(index) or [""]}
        load = getattr(self.source, "load_image", self.source.load)
        sample = load(index)
        pixels = resize_shorter(sample.image, self.resolution)
        return {**item, "image": _to_tensor(_center(pixels, self.resolution)).div_(127.5).sub_(1.0),
                "captions": sample.captions or [""]}

    def fingerprint(self) -> str:
        """What the items are made of, cheaply (no image decoded): the source's fingerprint,
        the indices, resolution and crop; the frozen-encoder disk cache is keyed by it."""
        source = getattr(self.source, "fingerprint", None)
        if source is None:
            raise TypeError(f"{type(self.source).__name__} has no fingerprint()")
        digest = hashlib.sha1(json.dumps([source(), self.resolution, self.random_crop,
                                          self.indices]).encode())
        return digest.hexdigest()

    def scan(self, skip_bad: bool) -> tuple[list[int], list[str]]:
        """Load every sample once (filling the condition cache). Returns the kept indices and
        the errors of the skipped unreadable ones; without skip_bad the first one raises."""
        kept, bad = [], []
        for index in self.indices:
            try:
                self.load_arrays(index)
                kept.append(index)
            except UnreadableImage as err:
                if not skip_bad:
                    raise
                bad.append(str(err))
        return kept, bad


def _center(pixels: np.ndarray, resolution: int) -> np.ndarray:
    """The center resolution x resolution window (training's crop without random_crop)."""
    top, left = crop_box(*pixels.shape[:2], resolution, None)
    return pixels[top:top + resolution, left:left + resolution]


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W), values unscaled. Transposed as bytes first: a float
    conversion of the strided (permuted) view costs several times more at 512 px."""
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).float()

"""Cache what the frozen VAE and text encoder produce: the base never changes during training.

Latents are cached as the VAE posterior's moments (mean, std) per dataset index, so every step
still draws a fresh latent sample, exactly as `latent_dist.sample()` would. Text embeddings are
cached per caption string (the empty caption included), so prompt dropout still acts per sample.
For the families whose ControlNet reads the condition's VAE latents (SD3, Flux), the condition's
moments are cached the same way (cache.conditions): the condition is then never decoded nor
encoded in a training step, and condition dropout swaps in the black image's latents.

The cache is filled before training, in fixed batches of the dataset's own order (`chunks_of`,
`fill_batches`, `encode_chunk`), by both stores: this one in memory, and the memory-mapped
shards on disk that later runs reuse (encode_store.DiskEncoderCache). The fill reads through its own DataLoader
(cache.fill_workers processes on a GPU), decoding the images, and the conditions only when their
latents are cached. During
training a batch's cached rows are read in one gather and reach the GPU in one pinned copy.
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from cnexp.data.workers import resolve_workers
from cnexp.errors import CnexpError


KINDS = ("images", "conditions")  # the per-index tables: target images', conditions' moments


class FillChunk(NamedTuple):
    """One fill batch: images (B, 3, R, R) in [-1, 1] and conditions (B, 3, R, R) in [0, 1]
    (None where not decoded), the items' dataset indices, all captions of its samples."""
    images: torch.Tensor | None
    conditions: torch.Tensor | None
    indices: list[int]
    captions: list[str]


class Encoders(NamedTuple):
    """The frozen encoders a fill calls: pixels in [-1, 1] -> moments (B, 2C, h, w), captions ->
    (B, T, D); conditions: as images, for a condition in [0, 1] (None: not cached)."""
    images: Callable[[torch.Tensor], torch.Tensor]
    text: Callable[[list[str]], torch.Tensor]
    conditions: Callable[[torch.Tensor], torch.Tensor] | None = None


class FillView(Dataset):
    """What the fill encodes of each item: {"image", "condition" (each only if asked), "index",
    "captions"}; datasets without `fill_item` (plain ones in tests) give their item and its one
    caption."""

    def __init__(self, dataset, images: bool, conditions: bool = False):
        self.dataset, self.images, self.conditions = dataset, images, conditions

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        if hasattr(self.dataset, "fill_item"):
            return self.dataset.fill_item(i, self.images, self.conditions)
        item = self.dataset[i]
        return {"image": item["image"], "condition": item["condition"], "index": item["index"],
                "captions": [item["caption"]]}


def _collate(items: list[dict]) -> FillChunk:
    def stacked(key):
        return torch.stack([x[key] for x in items]) if key in items[0] else None
    return FillChunk(stacked("image"), stacked("condition"), [int(x["index"]) for x in items],
                     [c for x in items for c in x["captions"]])


def chunks_of(start: int, stop: int, size: int) -> list[list[int]]:
    """Positions start..stop-1 in order, `size` at a time: the fill's encoder batches."""
    return [list(range(lo, min(lo + size, stop))) for lo in range(start, stop, size)]


def fill_batches(dataset, chunks: list[list[int]], images: bool = True, workers: int = 0,
                 pin: bool = False, conditions: bool = False) -> Iterator[FillChunk]:
    """One FillChunk per chunk of positions, in order."""
    if not chunks:
        return iter(())
    return iter(DataLoader(FillView(dataset, images, conditions), batch_sampler=chunks,
                           num_workers=workers, collate_fn=_collate, pin_memory=pin))


class Encoded(NamedTuple):
    """What one fill step adds to a store: moments per kind (None where not cached), the chunk's
    captions not known yet and their embeddings (None if none)."""
    moments: dict[str, torch.Tensor | None]
    new: list[str]
    embeddings: torch.Tensor | None


@torch.no_grad()
def encode_chunk(chunk: FillChunk, known: Callable[[str], bool], encoders: Encoders,
                 device: torch.device, cached: dict[str, bool], text: bool) -> Encoded:
    """Encode one fill batch: the kinds `cached` asks for and the captions not `known` yet."""
    moments = {"images": None, "conditions": None}
    if cached["images"]:
        moments["images"] = encoders.images(chunk.images.to(device, non_blocking=True))
    if cached["conditions"]:
        moments["conditions"] = encoders.conditions(chunk.conditions.to(device,
                                                                        non_blocking=True))
    new = list(dict.fromkeys(c for c in [*chunk.captions, ""] if not known(c))) if text else []
    return Encoded(moments, new, encoders.text(new) if new else None)


def to_device(host: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """One copy of `host` to `device`; on a GPU from pinned memory, so the host does not wait."""
    if device is None or host.device == device:
        return host
    if device.type == "cuda" and host.device.type == "cpu":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


class FrozenEncoderCache:
    """The in-memory store (cache.store=memory), and the look-ups both stores share."""

    def __init__(self, latents: bool = True, text: bool = True, fill_batch: int = 64,
                 fill_workers: int | str = "auto", conditions: bool = False):
        self.use_latents, self.use_text, self.fill_batch = latents, text, fill_batch
        self.use_conditions = conditions  # set only where the family's control reads latents
        self.fill_workers = fill_workers
        # filled: index -> (2C, h, w) mean|std, per kind (the target image's, the condition's)
        self.filled: dict[str, dict[int, torch.Tensor]] = {kind: {} for kind in KINDS}
        self.latent_moments = self.filled["images"]
        self.text: dict[str, torch.Tensor] = {}  # filled: caption -> (T, D)
        # encoded on demand during training (not in the filled set: another split's items);
        # kept apart so they never change what the fill stores
        self.extra: dict[str, dict[int, torch.Tensor]] = {kind: {} for kind in KINDS}
        self.extra_text: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def caches(self, kind: str) -> bool:
        return self.use_latents if kind == "images" else self.use_conditions

    def stored_moments(self, index: int, kind: str = "images") -> torch.Tensor | None:
        return self.filled[kind].get(index)

    def stored_text(self, caption: str) -> torch.Tensor | None:
        return self.text.get(caption)

    def read_moments(self, indices: list[int],
                     kind: str = "images") -> tuple[torch.Tensor | None, list[int]]:
        """The filled moments of `indices` stacked on the host (F, 2C, h, w), in order, and the
        positions in `indices` they belong to. The disk store reads them in one gather."""
        table = self.filled[kind]
        found = [p for p, idx in enumerate(indices) if idx in table]
        rows = torch.stack([table[indices[p]] for p in found]) if found else None
        return rows, found

    def read_text(self, captions: list[str]) -> tuple[torch.Tensor | None, list[int]]:
        """As read_moments, for caption embeddings (F, T, D)."""
        found = [p for p, c in enumerate(captions) if c in self.text]
        rows = torch.stack([self.text[captions[p]] for p in found]) if found else None
        return rows, found

    def moments(self, encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor,
                indices: list[int] | None, kind: str = "images") -> torch.Tensor:
        """(B, 2C, h, w) posterior moments of the items' `kind`; encodes only those not cached.
        With every index filled (training) `pixels` is not looked at: the loader may leave it
        empty."""
        if not self.caches(kind) or indices is None:
            return encode(pixels)
        rows, found = self.read_moments(indices, kind)
        if len(found) == len(indices):  # the steady state: one gather, one copy
            self.hits += len(indices)
            return to_device(rows, pixels.device)
        extra = self.extra[kind]
        out: list[torch.Tensor | None] = [None] * len(indices)
        for p, row in zip(found, to_device(rows, pixels.device) if found else ()):
            out[p] = row
        need = [p for p, o in enumerate(out) if o is None and indices[p] not in extra]
        if need and pixels.numel() == 0:
            raise CnexpError(f"dataset items {[indices[p] for p in need]} are not in the frozen-"
                             f"encoder cache and their {kind} were not loaded: the cache must be "
                             "filled (precompute) over the training set before training")
        for p, encoded in zip(need, encode(pixels[need]) if need else ()):
            extra[indices[p]] = encoded
        out = [o if o is not None else extra[indices[p]].to(pixels.device)
               for p, o in enumerate(out)]
        self.hits += len(indices) - len(need)
        self.misses += len(need)
        return torch.stack(out)

    def embeddings(self, encode: Callable[[list[str]], torch.Tensor], prompts: list[str],
                   device: torch.device | None = None) -> torch.Tensor:
        """(B, T, D) text embeddings; encodes only captions not cached."""
        if not self.use_text:
            return encode(prompts)
        unique = list(dict.fromkeys(prompts))
        rows, found = self.read_text(unique)
        if len(found) == len(unique):  # the steady state: one gather, one copy
            position = {p: i for i, p in enumerate(unique)}
            order = torch.tensor([position[p] for p in prompts], device=rows.device)
            return to_device(rows[order], device)  # (B, T, D), repeats included
        got = dict(zip((unique[p] for p in found), rows if found else ()))
        new = [p for p in unique if p not in got and p not in self.extra_text]
        if new:
            self.extra_text.update(zip(new, encode(new)))
        got.update({p: self.extra_text[p] for p in unique if p not in got})
        return torch.stack([got[p].to(device, non_blocking=True) if device is not None
                            else got[p] for p in prompts])

    def fill_loader_args(self, device: torch.device) -> dict:
        """How the fill reads the dataset: workers (auto: a GPU's share of the CPUs), pinning,
        and what it decodes (a text-only cache decodes no image)."""
        gpu = device.type == "cuda"
        return {"images": self.use_latents, "conditions": self.use_conditions,
                "workers": resolve_workers(self.fill_workers, gpu), "pin": gpu}

    def encode(self, chunk: FillChunk, known: Callable[[str], bool], encoders: Encoders,
               device: torch.device) -> Encoded:
        return encode_chunk(chunk, known, encoders, device,
                            {kind: self.caches(kind) for kind in KINDS}, self.use_text)

    def wants_fill(self) -> bool:
        return self.use_latents or self.use_text or self.use_conditions

    @torch.no_grad()
    def precompute(self, dataset, encode_images: Callable[[torch.Tensor], torch.Tensor],
                   encode_text: Callable[[list[str]], torch.Tensor], device: torch.device,
                   progress: bool = False, encode_conditions=None) -> None:
        """Fill the cache before training, in fixed chunks of the dataset's own order.

        Encoding lazily would make each cached value depend on which other images shared its
        first batch (CPU kernels are not batch-invariant to the last bit), so a resumed run would
        drift from an uninterrupted one. A fixed order makes the cache a pure function of the data.
        """
        if not self.wants_fill():
            return
        encoders = Encoders(encode_images, encode_text, encode_conditions)
        chunks = chunks_of(0, len(dataset), self.fill_batch)
        for chunk in fill_batches(dataset, chunks, **self.fill_loader_args(device)):
            encoded = self.encode(chunk, self.text.__contains__, encoders, device)
            for kind, moments in encoded.moments.items():
                if moments is not None:
                    self.filled[kind].update(zip(chunk.indices, moments))
            if encoded.embeddings is not None:
                self.text.update(zip(encoded.new, encoded.embeddings))
        self.hits = self.misses = 0

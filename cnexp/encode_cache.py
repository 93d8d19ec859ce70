"""Cache what the frozen VAE and text encoder produce: the base never changes during training.

Latents are cached as the VAE posterior's moments (mean, std) per dataset index, so every step
still draws a fresh latent sample, exactly as `latent_dist.sample()` would. Text embeddings are
cached per caption string (the empty caption included), so prompt dropout still acts per sample.

The cache is filled before training, in fixed batches of the dataset's own order (`chunks_of`,
`fill_batches`, `encode_chunk`), by both stores: this one in memory, and the memory-mapped
shards on disk that later runs reuse (encode_store.DiskEncoderCache). The fill reads through its own DataLoader
(cache.fill_workers processes on a GPU), decoding the images and none of the conditions. During
training a batch's cached rows are read in one gather and reach the GPU in one pinned copy.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from cnexp.data.workers import resolve_workers
from cnexp.errors import CnexpError


class FillView(Dataset):
    """What the fill encodes of each item: {"image": (3, R, R) or absent, "index", "captions"};
    datasets without `fill_item` (plain ones in tests) give their item and its one caption."""

    def __init__(self, dataset, images: bool):
        self.dataset, self.images = dataset, images

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        if hasattr(self.dataset, "fill_item"):
            return self.dataset.fill_item(i, self.images)
        item = self.dataset[i]
        return {"image": item["image"], "index": item["index"], "captions": [item["caption"]]}


def _collate(items: list[dict]) -> tuple[torch.Tensor | None, list[int], list[str]]:
    images = torch.stack([x["image"] for x in items]) if "image" in items[0] else None
    return images, [int(x["index"]) for x in items], [c for x in items for c in x["captions"]]


def chunks_of(start: int, stop: int, size: int) -> list[list[int]]:
    """Positions start..stop-1 in order, `size` at a time: the fill's encoder batches."""
    return [list(range(lo, min(lo + size, stop))) for lo in range(start, stop, size)]


def fill_batches(dataset, chunks: list[list[int]], images: bool = True, workers: int = 0,
                 pin: bool = False) -> Iterator[tuple[torch.Tensor | None, list[int], list[str]]]:
    """One batch per chunk of positions, in order: (images (B, 3, R, R) or None, the items'
    dataset indices, all captions of the chunk's samples)."""
    if not chunks:
        return iter(())
    return iter(DataLoader(FillView(dataset, images), batch_sampler=chunks, num_workers=workers,
                           collate_fn=_collate, pin_memory=pin))


@torch.no_grad()
def encode_chunk(images: torch.Tensor | None, captions: list[str], known: Callable[[str], bool],
                 encode_images, encode_text, device: torch.device, latents: bool, text: bool):
    """(moments of the images or None, the chunk's captions not `known` yet, their embeddings or
    None): what one fill step adds to a store."""
    moments = None
    if latents:
        moments = encode_images(images.to(device, non_blocking=True))
    new = list(dict.fromkeys(c for c in [*captions, ""] if not known(c))) if text else []
    return moments, new, (encode_text(new) if new else None)


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
                 fill_workers: int | str = "auto"):
        self.use_latents, self.use_text, self.fill_batch = latents, text, fill_batch
        self.fill_workers = fill_workers
        self.latent_moments: dict[int, torch.Tensor] = {}  # filled: index -> (2C, h, w) mean|std
        self.text: dict[str, torch.Tensor] = {}  # filled: caption -> (T, D)
        # encoded on demand during training (not in the filled set: another split's captions);
        # kept apart so they never change what the fill stores
        self.extra_moments: dict[int, torch.Tensor] = {}
        self.extra_text: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def stored_moments(self, index: int) -> torch.Tensor | None:
        return self.latent_moments.get(index)

    def stored_text(self, caption: str) -> torch.Tensor | None:
        return self.text.get(caption)

    def read_moments(self, indices: list[int]) -> tuple[torch.Tensor | None, list[int]]:
        """The filled moments of `indices` stacked on the host (F, 2C, h, w), in order, and the
        positions in `indices` they belong to. The disk store reads them in one gather."""
        found = [p for p, idx in enumerate(indices) if idx in self.latent_moments]
        rows = torch.stack([self.latent_moments[indices[p]] for p in found]) if found else None
        return rows, found

    def read_text(self, captions: list[str]) -> tuple[torch.Tensor | None, list[int]]:
        """As read_moments, for caption embeddings (F, T, D)."""
        found = [p for p, c in enumerate(captions) if c in self.text]
        rows = torch.stack([self.text[captions[p]] for p in found]) if found else None
        return rows, found

    def moments(self, encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                indices: list[int] | None) -> torch.Tensor:
        """(B, 2C, h, w) posterior moments; encodes only the images not cached. With every
        index filled (training) `images` is not looked at: the loader may leave it empty."""
        if not self.use_latents or indices is None:
            return encode(images)
        rows, found = self.read_moments(indices)
        if len(found) == len(indices):  # the steady state: one gather, one copy
            self.hits += len(indices)
            return to_device(rows, images.device)
        out: list[torch.Tensor | None] = [None] * len(indices)
        for p, row in zip(found, to_device(rows, images.device) if found else ()):
            out[p] = row
        need = [p for p, o in enumerate(out) if o is None and indices[p] not in self.extra_moments]
        if need and images.numel() == 0:
            raise CnexpError(f"dataset items {[indices[p] for p in need]} are not in the frozen-"
                             "encoder cache and their images were not loaded: the cache must be "
                             "filled (precompute) over the training set before training")
        for p, encoded in zip(need, encode(images[need]) if need else ()):
            self.extra_moments[indices[p]] = encoded
        out = [o if o is not None else self.extra_moments[indices[p]].to(images.device)
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
        and whether images are needed at all (a text-only cache decodes none)."""
        gpu = device.type == "cuda"
        return {"images": self.use_latents, "workers": resolve_workers(self.fill_workers, gpu),
                "pin": gpu}

    @torch.no_grad()
    def precompute(self, dataset, encode_images: Callable[[torch.Tensor], torch.Tensor],
                   encode_text: Callable[[list[str]], torch.Tensor], device: torch.device,
                   progress: bool = False) -> None:
        """Fill the cache before training, in fixed chunks of the dataset's own order.

        Encoding lazily would make each cached value depend on which other images shared its
        first batch (CPU kernels are not batch-invariant to the last bit), so a resumed run would
        drift from an uninterrupted one. A fixed order makes the cache a pure function of the data.
        """
        if not (self.use_latents or self.use_text):
            return
        chunks = chunks_of(0, len(dataset), self.fill_batch)
        for images, indices, captions in fill_batches(dataset, chunks,
                                                      **self.fill_loader_args(device)):
            moments, new, embeds = encode_chunk(images, captions, self.text.__contains__,
                                                encode_images, encode_text, device,
                                                self.use_latents, self.use_text)
            if moments is not None:
                self.latent_moments.update(zip(indices, moments))
            if embeds is not None:
                self.text.update(zip(new, embeds))
        self.hits = self.misses = 0

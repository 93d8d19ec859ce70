"""Cache what the frozen VAE and text encoder produce: the base never changes during training.

Latents are cached as the VAE posterior's moments (mean, std) per dataset index, so every step
still draws a fresh latent sample, exactly as `latent_dist.sample()` would. Text embeddings are
cached per caption string (the empty caption included), so prompt dropout still acts per sample.

The cache is filled before training, in fixed batches of the dataset's own order (`fill_chunks`,
`encode_chunk`), by both stores: this one in memory, and the memory-mapped shards on disk that
later runs reuse (encode_store.DiskEncoderCache). Same chunks, same values, bit for bit.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch


def fill_chunks(dataset, start: int, stop: int, size: int) -> Iterator[tuple[list[dict], list]]:
    """Items start..stop-1 of `dataset`, `size` at a time, each chunk with the captions of its
    items (all of a sample's captions where the dataset can tell, else the item's own)."""
    for lo in range(start, stop, size):
        chunk = [dataset.item_and_captions(i) if hasattr(dataset, "item_and_captions")
                 else (dataset[i], None) for i in range(lo, min(lo + size, stop))]
        items = [item for item, _ in chunk]
        captions = [c for item, caps in chunk for c in (caps or [item["caption"]])]
        yield items, captions


@torch.no_grad()
def encode_chunk(items: list[dict], captions: list[str], known: Callable[[str], bool],
                 encode_images, encode_text, device: torch.device, latents: bool, text: bool):
    """(moments of the items or None, the chunk's captions not `known` yet, their embeddings or
    None): what one fill step adds to a store."""
    moments = None
    if latents:
        moments = encode_images(torch.stack([x["image"] for x in items]).to(device))
    new = list(dict.fromkeys(c for c in [*captions, ""] if not known(c))) if text else []
    return moments, new, (encode_text(new) if new else None)


class FrozenEncoderCache:
    """The in-memory store (cache.store=memory), and the look-ups both stores share."""

    def __init__(self, latents: bool = True, text: bool = True, fill_batch: int = 64):
        self.use_latents, self.use_text, self.fill_batch = latents, text, fill_batch
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

    def moments(self, encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                indices: list[int] | None) -> torch.Tensor:
        """(B, 2C, h, w) posterior moments; encodes only the images not cached."""
        if not self.use_latents or indices is None:
            return encode(images)
        found = [self.stored_moments(idx) for idx in indices]
        found = [f if f is not None else self.extra_moments.get(idx)
                 for f, idx in zip(found, indices)]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            for i, moments in zip(missing, encode(images[missing])):
                self.extra_moments[indices[i]] = found[i] = moments
        self.hits += len(indices) - len(missing)
        self.misses += len(missing)
        return torch.stack([f.to(images.device, non_blocking=True) for f in found])

    def embeddings(self, encode: Callable[[list[str]], torch.Tensor], prompts: list[str],
                   device: torch.device | None = None) -> torch.Tensor:
        """(B, T, D) text embeddings; encodes only captions not cached."""
        if not self.use_text:
            return encode(prompts)
        found = {p: self.stored_text(p) for p in dict.fromkeys(prompts)}
        found = {p: f if f is not None else self.extra_text.get(p) for p, f in found.items()}
        new = [p for p, f in found.items() if f is None]
        if new:
            self.extra_text.update(zip(new, encode(new)))
            found.update({p: self.extra_text[p] for p in new})
        return torch.stack([found[p].to(device, non_blocking=True) if device is not None
                            else found[p] for p in prompts])

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
        for items, captions in fill_chunks(dataset, 0, len(dataset), self.fill_batch):
            moments, new, embeds = encode_chunk(items, captions, self.text.__contains__,
                                                encode_images, encode_text, device,
                                                self.use_latents, self.use_text)
            if moments is not None:
                self.latent_moments.update(zip((int(x["index"]) for x in items), moments))
            if embeds is not None:
                self.text.update(zip(new, embeds))
        self.hits = self.misses = 0

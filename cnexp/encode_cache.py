"""Cache what the frozen VAE and text encoder produce: the base never changes during training.

Latents are cached as the VAE posterior's moments (mean, std) per dataset index, so every step
still draws a fresh latent sample, exactly as `latent_dist.sample()` would. Text embeddings are
cached per caption string (the empty caption included), so prompt dropout still acts per sample.
"""
from __future__ import annotations

from typing import Callable

import torch


class FrozenEncoderCache:
    def __init__(self, latents: bool = True, text: bool = True):
        self.use_latents, self.use_text = latents, text
        self.latent_moments: dict[int, torch.Tensor] = {}  # index -> (2C, h, w): mean | std
        self.text: dict[str, torch.Tensor] = {}  # caption -> (T, D)
        self.hits = self.misses = 0

    def moments(self, encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                indices: list[int] | None) -> torch.Tensor:
        """(B, 2C, h, w) posterior moments; encodes only the images not seen before."""
        if not self.use_latents or indices is None:
            return encode(images)
        missing = [i for i, idx in enumerate(indices) if idx not in self.latent_moments]
        if missing:
            for i, moments in zip(missing, encode(images[missing])):
                self.latent_moments[indices[i]] = moments
        self.hits += len(indices) - len(missing)
        self.misses += len(missing)
        return torch.stack([self.latent_moments[idx] for idx in indices])

    def embeddings(self, encode: Callable[[list[str]], torch.Tensor],
                   prompts: list[str]) -> torch.Tensor:
        """(B, T, D) text embeddings; encodes only captions not seen before."""
        if not self.use_text:
            return encode(prompts)
        new = list(dict.fromkeys(p for p in prompts if p not in self.text))
        if new:
            self.text.update(zip(new, encode(new)))
        return torch.stack([self.text[p] for p in prompts])

    @torch.no_grad()
    def precompute(self, dataset, encode_images: Callable[[torch.Tensor], torch.Tensor],
                   encode_text: Callable[[list[str]], torch.Tensor], device: torch.device,
                   chunk: int = 64) -> None:
        """Fill the cache before training, in fixed chunks of the dataset's own order.

        Encoding lazily would make each cached value depend on which other images shared its
        first batch (CPU kernels are not batch-invariant to the last bit), so a resumed run would
        drift from an uninterrupted one. A fixed order makes the cache a pure function of the data.
        """
        if not (self.use_latents or self.use_text):
            return
        for start in range(0, len(dataset), chunk):
            items = [dataset[i] for i in range(start, min(start + chunk, len(dataset)))]
            if self.use_latents:
                images = torch.stack([x["image"] for x in items]).to(device)
                self.moments(encode_images, images, [int(x["index"]) for x in items])
            if self.use_text:
                self.embeddings(encode_text, [x["caption"] for x in items] + [""])
        self.hits = self.misses = 0

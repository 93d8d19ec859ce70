"""The data path alone: how many training images per second it delivers with the encoder cache
filled, before and after issue 22, side by side in one process.

    python -m cnexp.bench --loader [--images 32] [--batch 8] [--resolution 512] [--rounds 3]
    python -m cnexp.bench --loader --fill-invariance [--resolution 512]   (fill batch 4 vs 16)

It writes `--images` fill50k triples at `--resolution` (targets photo-like JPEGs, conditions
edge-map PNGs), fills a disk encoder cache with SD 1.5-shaped rows (latent moments (8, 64, 64)
and caption embeddings (77, 768), fp32; a stand-in encoder, no model), then reads shuffled
batches the way training does, alternating two paths round by round:

- before: the target image decoded and converted though its latents are cached, one cache row
  read per image and per caption, no loader workers (the SD data presets' data.num_workers=0);
- after: the target left undecoded, one gather per batch, the loader a GPU run gets by default
  (data.num_workers=auto: workers from this machine's CPUs, persistent; pinned on a GPU);
- after0: after without workers, to tell what the workers add.

Each round's figure is images/s over `--batches` batches after a warm-up; the step rate the
path could feed is images/s over the batch. docs/performance.md ("The data path").
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader

from cnexp.data.dataset import TriplesDataset
from cnexp.data.fill50k import Fill50kSource
from cnexp.data.images import crop_box
from cnexp.data.workers import resolve_workers
from cnexp.encode_store import DiskEncoderCache

LATENT = (8, 64, 64)  # SD 1.5 at 512 px: mean|std of 4 channels at 1/8 the side
TEXT = (77, 768)  # CLIP ViT-L/14 tokens x width


def write_triples(root: Path, n: int, resolution: int, seed: int = 0) -> Path:
    """n fill50k triples: smooth-noise JPEG targets (decode like photos), outline PNG conditions."""
    rng = np.random.default_rng(seed)
    (root / "target").mkdir(parents=True)
    (root / "source").mkdir()
    lines = []
    for i in range(n):
        coarse = rng.integers(0, 256, (resolution // 16, resolution // 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((resolution, resolution), Image.BICUBIC)
        image = Image.fromarray(np.clip(np.asarray(image, np.int16) + rng.integers(
            -12, 13, (resolution, resolution, 3)), 0, 255).astype(np.uint8))
        image.save(root / "target" / f"{i}.jpg", quality=90)
        edges = image.convert("L").filter(ImageFilter.FIND_EDGES).point(lambda v: 255 * (v > 40))
        condition = Image.new("RGB", image.size)
        ImageDraw.Draw(condition).bitmap((0, 0), edges.convert("1"), fill=(255, 255, 255))
        condition.save(root / "source" / f"{i}.png")
        lines.append(f'{{"source": "source/{i}.png", "target": "target/{i}.jpg", '
                     f'"prompt": "image {i}"}}')
    (root / "prompt.json").write_text("\n".join(lines) + "\n")
    return root


def fill_cache(root: Path, dataset: TriplesDataset) -> DiskEncoderCache:
    """The disk cache filled with stand-in rows of SD 1.5's shapes (what the data path reads)."""
    def encode_images(x):  # (B, 3, R, R) -> (B, 8, R/8, R/8)
        pooled = F.avg_pool2d(x, 8)
        return torch.cat([pooled, pooled.abs(), pooled[:, :2]], dim=1)

    def encode_text(prompts):
        return torch.stack([torch.full(TEXT, float(len(p))) for p in prompts])

    cache = DiskEncoderCache(root, {"bench": "loader"}, fill_batch=16, fill_workers=0)
    cache.precompute(dataset, encode_images, encode_text, torch.device("cpu"))
    return cache


class Before(TriplesDataset):
    """Items as cnexp/data/dataset.py made them at 1a8ce88 (kept here verbatim to time them):
    image and condition decoded and converted whatever the cache holds."""

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        image, condition, sample = self.load_arrays(index)
        offset = tuple(torch.rand(2).tolist()) if self.train and self.random_crop else None
        top, left = crop_box(*image.shape[:2], self.resolution, offset)
        window = (slice(top, top + self.resolution), slice(left, left + self.resolution))
        image, condition = image[window], condition[window]
        captions = sample.captions or [""]
        pick = int(torch.randint(len(captions), ())) if self.train and len(captions) > 1 else 0
        return {
            "condition": torch.from_numpy(condition.copy()).permute(2, 0, 1).float() / 255.0,
            "image": torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 127.5 - 1.0,
            "caption": captions[pick],
            "index": index,
        }


def old_reads(cache: DiskEncoderCache, batch: dict) -> None:
    """Before: one row copied out per image and per caption, then stacked (encode_cache.py at
    1a8ce88)."""
    torch.stack([cache.stored_moments(i) for i in batch["index"].tolist()])
    torch.stack([cache.stored_text(c) for c in batch["caption"]])


def new_reads(cache: DiskEncoderCache, batch: dict) -> None:
    cache.moments(None, batch["image"], batch["index"].tolist())
    cache.embeddings(None, list(batch["caption"]))


def loader(dataset: TriplesDataset, batch: int, workers: int, seed: int) -> DataLoader:
    gpu = torch.cuda.is_available()
    return DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                      num_workers=workers, persistent_workers=workers > 0, pin_memory=gpu,
                      generator=torch.Generator().manual_seed(seed))


def endless(data: DataLoader):
    while True:
        yield from data


def images_per_second(batches, reads, cache, n: int, batch: int, ready: int = 0) -> float:
    """Images/s over n batches, after taking the `ready` ones its workers prefetched while
    another path was timed (else they would count as free)."""
    for _ in range(ready):
        next(batches)
    start = time.perf_counter()
    for _ in range(n):
        reads(cache, next(batches))
    return n * batch / (time.perf_counter() - start)


@torch.no_grad()
def fill_invariance(resolution: int, images: int = 16, batches: tuple = (4, 16)) -> None:
    """What cache.fill_batch costs in bitwise equality: the same images' VAE moments encoded
    `batches[0]` vs `batches[1]` at a time (SD 1.5-shaped VAE, random weights; on the GPU in
    fp32 and bf16 when there is one)."""
    from diffusers import AutoencoderKL

    from cnexp.bench.sd_shapes import scaled_configs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    vae = AutoencoderKL(**scaled_configs("15")["vae"]).eval().to(device)
    x = torch.rand(images, 3, resolution, resolution, device=device) * 2 - 1
    for dtype in (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,):
        vae.to(dtype)
        a, b = (torch.cat([torch.cat([d.mean, d.std], 1).float() for d in (
            vae.encode(x[lo:lo + n].to(dtype)).latent_dist for lo in range(0, images, n))])
            for n in batches)
        diff = (a - b).abs()
        print(f"fill batch {batches[0]} vs {batches[1]}, {device.type} {str(dtype)[6:]}, "
              f"{resolution} px, {images} images: bitwise equal {torch.equal(a, b)}, max abs "
              f"diff {diff.max().item():.3g} (moments' mean magnitude {a.abs().mean().item():.3g})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loader", action="store_true", help="this mode (python -m cnexp.bench)")
    parser.add_argument("--images", type=int, default=32, help="training triples written")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, help="write the triples and cache here (default: a "
                        "temporary directory, removed after)")
    parser.add_argument("--fill-invariance", action="store_true",
                        help="instead: VAE moments at fill batch 4 vs 16 (docs/gpu.md)")
    args = parser.parse_args(argv)
    if args.fill_invariance:
        return fill_invariance(args.resolution)
    workers = resolve_workers("auto", gpu=True)  # what a GPU run on this machine gets
    with tempfile.TemporaryDirectory(prefix="cnexp-loader-", dir=args.work) as work:
        root = write_triples(Path(work) / "data", args.images, args.resolution)
        before = Before(Fill50kSource(root), args.resolution, train=True)
        after = TriplesDataset(Fill50kSource(root), args.resolution, train=True)
        after.latents_cached = True  # as the datamodule sets it when cache.latents=true
        cache = fill_cache(Path(work) / "encoders", before)
        paths = {"before": (endless(loader(before, args.batch, 0, 0)), old_reads, 0),
                 "after": (endless(loader(after, args.batch, workers, 0)), new_reads,
                           2 * workers),  # the DataLoader's prefetch_factor (2) per worker
                 "after0": (endless(loader(after, args.batch, 0, 0)), new_reads, 0)}
        for batches, reads, _ in paths.values():  # warm-up: workers started, files cached
            images_per_second(batches, reads, cache, 2, args.batch)
        rounds = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, (batches, reads, ready) in paths.items():
                rounds[name].append(images_per_second(batches, reads, cache, args.batches,
                                                      args.batch, ready))
    print(f"data path, {args.resolution} px, batch {args.batch}, encoder cache filled (disk), "
          f"{args.batches} batches x {args.rounds} rounds, torch threads "
          f"{torch.get_num_threads()}")
    how = {"before": "target decoded, a row per read, 0 workers",
           "after": f"no target decode, a gather per batch, {workers} worker(s)",
           "after0": "the same without workers: what the decode and reads alone buy"}
    medians = {name: statistics.median(values) for name, values in rounds.items()}
    for name, values in rounds.items():
        print(f"{name:7} {medians[name]:8.1f} images/s = {medians[name] / args.batch:6.1f} "
              f"steps/s it could feed  ({how[name]}; rounds: "
              + ", ".join(f"{v:.1f}" for v in values) + ")")
    print(f"after / before: {medians['after'] / medians['before']:.2f}x (medians; per round: "
          + ", ".join(f"{a / b:.2f}x" for a, b in zip(rounds["after"], rounds["before"])) + ")")

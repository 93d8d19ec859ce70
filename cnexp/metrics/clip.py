"""CLIP score (torchmetrics' CLIPScore) with any CLIP model: a hub id or a local directory.

The registered sample metric `clip_score` (eval.clip_score, with base.clip_model): each sample
against its own caption (does it show the content?) and, under the conflicting prompt, also
`clip_score_prompt` against the prompt it was given (which one won?).

CLIPScore accepts only a few hub ids by name, or a callable returning (model, processor); we
pass the callable, so base.clip_model can be the tiny world's own CLIP (assets/tinyworld/clip)
or any hub CLIP alike. The SD bases use LITERATURE_CLIP, the model CLIP scores of SD-family
papers are reported with; base.clip_model=openai/clip-vit-base-patch16 gives ControlNet++'s.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from torch import nn
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor

from cnexp.errors import CnexpError
from cnexp.metrics.registry import SampleMetric, Samples, register


LITERATURE_CLIP = "openai/clip-vit-large-patch14"  # ViT-L/14: conf/base/sd15.yaml, sd21.yaml


class ClipUnavailable(CnexpError):
    pass


def _tensor(features) -> torch.Tensor:
    # transformers >= 5 returns a ModelOutput whose pooler_output is the projected embedding;
    # torchmetrics 1.9 expects the tensor itself (Lightning-AI/torchmetrics#3407)
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class TensorFeaturesCLIP(nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return tensors, as
    torchmetrics' CLIPScore expects, with any transformers version."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.model.get_text_features(*args, **kwargs))


@functools.lru_cache(maxsize=2)
def load_clip(source: str) -> tuple[TensorFeaturesCLIP, CLIPProcessor]:
    """Frozen CLIP model + processor from a directory or a hub id (loaded once per process)."""
    local = Path(source).expanduser()
    try:
        model = CLIPModel.from_pretrained(str(local) if local.is_dir() else source,
                                          local_files_only=local.is_dir())
        processor = CLIPProcessor.from_pretrained(str(local) if local.is_dir() else source,
                                                  local_files_only=local.is_dir())
    except (OSError, ValueError) as err:
        raise ClipUnavailable(
            f"Cannot load the CLIP model base.clip_model='{source}' for CLIP score: "
            f"{str(err).splitlines()[0]}. Point base.clip_model to a directory with a CLIPModel "
            "and CLIPProcessor (the tiny world's: assets/tinyworld/clip), or turn CLIP score off "
            "with eval.clip_score=false") from None
    model.requires_grad_(False).eval()
    return TensorFeaturesCLIP(model), processor


class QuietCLIPScore(CLIPScore):
    """CLIPScore without the tokenizer's warning, on every update, that padding=True ignores
    its model_max_length (captions longer than CLIP's context are still truncated)."""

    def update(self, source, target) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*max_length. is ignored when .padding.")
            super().update(source, target)


def clip_score_metric(source: str) -> CLIPScore:
    """torchmetrics' CLIPScore (100 x cosine, averaged; states synced across ranks) with the
    CLIP model at `source`. Images go in as uint8 (N, 3, H, W)."""
    model, processor = load_clip(source)
    return QuietCLIPScore(model_name_or_path=lambda: (model, processor))


@register
class ClipScore(SampleMetric):
    name = "clip_score"
    label = "CLIP score"
    needs = ("samples", "captions", "prompts")
    higher_is_better = True
    also_logs = ("clip_score_prompt",)
    switch = "eval.clip_score (with base.clip_model)"

    def __init__(self):
        self.source, self.metric = None, None

    def enabled(self, cfg) -> bool:
        return bool(cfg.eval.clip_score and cfg.base.clip_model)

    def load(self, cfg, data) -> None:
        self.source = str(cfg.base.clip_model)
        load_clip(self.source)

    def prepare(self, device, holds_reference: bool) -> None:
        if self.metric is None:
            self.metric = clip_score_metric(self.source)
        self.metric.to(device)

    def score(self, samples: Samples) -> dict[str, float]:
        targets = {"clip_score": samples.captions}
        if samples.setting == "conflicting":
            targets["clip_score_prompt"] = samples.prompts
        scores = {}
        for key, texts in targets.items():
            if len(samples.pixels):
                self.metric.update(samples.pixels, list(texts))
            scores[key] = float(self.metric.compute())
            self.metric.reset()
        return scores


class CLIPImageFeatures(nn.Module):
    """CLIP image embeddings as an FID feature network (uint8 (N, 3, H, W) -> (N, D)):
    "FID_CLIP" (Kynkaanniemi et al. 2023), cheap with the tiny world's 64 px CLIP."""

    def __init__(self, source: str):
        super().__init__()
        self.clip, self.processor = load_clip(source)
        self.num_features = int(self.clip.config.projection_dim)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=list(images.cpu()), return_tensors="pt")["pixel_values"]
        return self.clip.get_image_features(pixel_values=pixels.to(images.device))

"""The sample-metric registry: what a full evaluation scores the generated images with.

A sample metric is one `SampleMetric` subclass, decorated `@register`, in a module of
cnexp/metrics/ (CLIP score: clip.py; FID: fid.py). It declares what it needs, which way is
better and what it logs; cnexp/metrics/callbacks.py runs every metric the run selects on each
prompt setting's samples and logs `eval/<setting>/<name>` (the perfect prompt's is copied to the
headline `eval/<name>`). Nothing else is edited to add one (docs/evaluation.md, "Adding a metric"):
- `eval.metrics`' choices (cnexp/knobs.py `MetricName`) are the names declared here, read from
  the modules' source, so a misspelt name fails at composition, listing them;
- compare reads `higher_is_better` and `label` from the registered classes (`described`).

A run scores a metric when it is in eval.metrics (null: every registered metric) and its own
switch (`enabled(cfg)`: eval.clip_score, eval.fid) is on.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Optional

from cnexp.errors import ConfigError
from cnexp.knobs import METRICS_PACKAGE
from cnexp.registry import Registry

if TYPE_CHECKING:
    import torch

log = logging.getLogger("cnexp")

# what a metric may read: the samples themselves, each sample's own caption (does the image
# show its content?), the prompt it was given under the setting, real validation images
NEEDS = ("samples", "captions", "prompts", "references")


@dataclass(frozen=True)
class Samples:
    """One prompt setting's samples on this rank (its block of the evaluation set, possibly
    empty under DDP) and what a metric may read beside them; what it did not declare in `needs`
    is None."""
    setting: str  # none | insufficient | conflicting | perfect
    images: Optional[torch.Tensor]  # (n, 3, H, W) float in [0, 1]
    pixels: Optional[torch.Tensor]  # the same, uint8 as a PNG holds them
    captions: Optional[list[str]]
    prompts: Optional[list[str]]

    def given(self, needs: tuple[str, ...]) -> "Samples":
        """What a metric that declared `needs` reads."""
        return dataclasses.replace(
            self, **{"images": self.images if "samples" in needs else None,
                     "pixels": self.pixels if "samples" in needs else None,
                     "captions": self.captions if "captions" in needs else None,
                     "prompts": self.prompts if "prompts" in needs else None})


class SampleMetric:
    """Scores the samples of a full evaluation, per prompt setting. One instance per run: `load`
    before training, `prepare` at each full evaluation, then `score` for each setting."""
    name: ClassVar[str]  # eval.metrics' choice and the logged eval/<setting>/<name>
    label: ClassVar[str] = ""  # compare's heading (the name when empty)
    needs: ClassVar[tuple[str, ...]] = ("samples",)  # of NEEDS
    higher_is_better: ClassVar[bool] = True  # for every key it logs
    also_logs: ClassVar[tuple[str, ...]] = ()  # keys beside `name` (CLIP: clip_score_prompt)
    min_images: ClassVar[int] = 1  # a smaller evaluation set is not scored (FID: 2)
    switch: ClassVar[str] = ""  # the knob(s) `enabled` reads, for messages

    def enabled(self, cfg) -> bool:
        """Whether the run config (cnexp.config.TrainConfig) turns it on."""
        return True

    def load(self, cfg, data) -> None:
        """Load what can fail (a network, a file) now, before training; `data` is the run's
        data module (its validation split holds the references, `references`)."""

    def prepare(self, device: torch.device, holds_reference: bool) -> None:
        """At each full evaluation: build the scoring state once, on the model's device.
        holds_reference: false on all ranks but one under DDP (states are summed across ranks)."""

    def update(self, samples: Samples) -> None:
        raise NotImplementedError

    def compute(self) -> float:
        """The value over every rank's updates (torchmetrics syncs when it computes)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the samples (not the references) before the next setting."""

    def score(self, samples: Samples) -> dict[str, float]:
        """{key: value} for one setting; every rank calls it, with or without samples."""
        if samples.images is not None and len(samples.images):
            self.update(samples)
        value = self.compute()
        self.reset()
        return {self.name: value}


def _check_needs(cls: type[SampleMetric]) -> None:
    unknown = set(cls.needs) - set(NEEDS)
    if unknown:
        raise TypeError(f"{cls.__name__}.needs has {sorted(unknown)}: use some of {list(NEEDS)}")


METRICS: Registry[type[SampleMetric]] = Registry(
    "sample metric", "eval.metrics", "cnexp.metrics", METRICS_PACKAGE, ConfigError,
    instances=False, check=_check_needs)
register = METRICS.register


def metric_names() -> list[str]:
    """Every metric: those declared in cnexp/metrics/, then any registered from elsewhere."""
    return METRICS.names()


def get_metric(name: str) -> type[SampleMetric]:
    """The metric class called `name`, importing just the module that declares it."""
    return METRICS.get(name)


def selected_metrics(cfg) -> list[SampleMetric]:
    """New instances of the metrics a run config scores: in eval.metrics (every registered one
    when it is null) and turned on by their own switch."""
    chosen = cfg.eval.get("metrics")  # absent in configs recorded before the knob
    names = metric_names() if chosen is None else list(dict.fromkeys(str(n) for n in chosen))
    metrics = [get_metric(name)() for name in names]
    for metric in metrics:
        if chosen is not None and not metric.enabled(cfg):
            log.warning("eval.metrics lists %s, but %s turns it off: not scored", metric.name,
                        metric.switch or "its switch")
    return [metric for metric in metrics if metric.enabled(cfg)]


# ---- references: the real validation images a metric compares with (FID) --------------------
@dataclass(frozen=True)
class References:
    count: int  # the first `count` validation images
    batch_size: int
    key: dict  # what identifies them, for a cache of statistics computed over them
    split: Any  # the validation dataset

    def batches(self) -> Iterator[torch.Tensor]:
        """uint8 (B, 3, H, W) batches of the images."""
        import torch

        from cnexp.metrics.pixels import to_uint8

        for start in range(0, self.count, self.batch_size):
            stop = min(start + self.batch_size, self.count)
            items = [self.split[i]["image"] for i in range(start, stop)]
            yield to_uint8((torch.stack(items) + 1) / 2)


def references(cfg, data, count: int) -> References:
    """The first `count` validation images of a run's data module (fewer if the split is)."""
    val = data.datasets["val"]
    count = min(count, len(val))
    root = Path(cfg.data.root).expanduser()
    key = {"root": str(root.resolve()) if root.exists() else str(cfg.data.root),
           "layout": cfg.data.layout, "split": "val", "images": count,
           "resolution": cfg.data.resolution, "crop": cfg.data.crop,
           "split_seed": cfg.data.split_seed}
    return References(count, cfg.eval.batch_size, key, val)


# ---- directions for compare ----------------------------------------------------------------
def described(key: str) -> dict[str, Any]:
    """{"higher_is_better": bool, "label": str} for a logged metric name (clip_score,
    clip_score_prompt, shape_iou, ...), or {} when no metric declares it: every registered
    metric (the declared ones imported here) and the fidelity table."""
    from cnexp.metrics.fidelity import FIDELITY

    for name in metric_names():
        cls = get_metric(name)
        if key in (cls.name, *cls.also_logs):
            return {"higher_is_better": cls.higher_is_better,
                    "label": cls.label if key == cls.name else ""}
    for fidelity in FIDELITY.values():
        if key in fidelity.metrics:
            return {"higher_is_better": fidelity.higher_is_better, "label": ""}
    return {}

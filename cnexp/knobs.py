"""The types that cnexp/config.py's fields declare: choices and ranges, each in one place.

Choices are Enums: OmegaConf checks an Enum field when a YAML file or an override sets it, so
`control.branch=lit` fails at composition with the knob's name and the list of its choices. Each
member's name is its value and the Enums subclass str, so `cfg.control.branch == "copy"`, f-strings,
JSON and the YAML of recorded configs all see the plain string.

Ranges are field metadata (`field(default=..., metadata=PROBABILITY)`); cnexp/validate.py walks
the schema and applies them to the composed config.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Union

from cnexp.registry import declared


class Choice(str, Enum):
    """A knob's choices; a member prints, formats and compares as its plain string."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


PACKAGE = Path(__file__).resolve().parent
CONTROL_PACKAGE, DATA_PACKAGE, METRICS_PACKAGE, FAMILIES_PACKAGE = (
    PACKAGE / n for n in ("control", "data", "metrics", "families"))


def declared_branches(directory: Path = CONTROL_PACKAGE) -> list[str]:
    """control.branch's choices: the names the branch modules register (cnexp/registry.py), so
    the registry and these choices agree (tests/test_branch_registry.py)."""
    return list(declared(directory, "cnexp.control" if directory == CONTROL_PACKAGE else None))


# control.branch: the trainable network, one module per branch in cnexp/control/ (copy, scratch:
# trainable_copy.py; lite; xs; lora_copy; t2i_adapter; see docs/ablations.md)
Branch = Choice("Branch", {name: name for name in declared_branches()})

# base.family: how the frozen base loads, encodes prompts, trains and samples, one module per
# family in cnexp/families/ (sd: SD 1.5/2.1 and the tiny world)
Family = Choice("Family", {name: name for name in declared(FAMILIES_PACKAGE, "cnexp.families")})

# eval.metrics: the sample metrics of a full evaluation, one registered SampleMetric per name in
# cnexp/metrics/ (clip_score: clip.py, fid: fid.py; cnexp/metrics/registry.py)
MetricName = Choice("MetricName",
                    {name: name for name in declared(METRICS_PACKAGE, "cnexp.metrics")})


class ConnectorInit(Choice):
    """control.connector_init: how the connectors start (cnexp/control/connectors.py)."""
    zero = "zero"  # the paper's zero convolutions
    gaussian = "gaussian"  # N(0, control.gaussian_std^2), the paper's "no zero convolution"
    kaiming = "kaiming"
    xavier = "xavier"
    default = "default"  # PyTorch's own conv init (biases too)


class Connector(Choice):
    """control.connector: how a connector's output enters the UNet (cnexp/control/)."""
    conv = "conv"  # as the conv gives it (the paper)
    cross_norm = "cross_norm"  # ControlNeXt: normalised with the frozen UNet's statistics


class AdapterType(Choice):
    """control.adapter_type: diffusers' T2I-Adapter variant (control.branch=t2i_adapter)."""
    full = "full"  # full_adapter (full_adapter_xl on bases whose first block does not attend)
    light = "light"  # light_adapter


class InitScope(Choice):
    """control.init_scope: which convs connector_init sets."""
    connectors = "connectors"
    connectors_and_hint = "connectors_and_hint"  # also the condition embedding's last conv


# data.layout: how the triples are stored, one module per layout in cnexp/data/ (a registered
# DataLayout, cnexp/data/layout.py); the built-in ones in the order the docs list them, any other
# after them
LAYOUT_ORDER = ("fill50k", "hf", "captions")
Layout = Choice("Layout", {name: name for name in sorted(
    declared(DATA_PACKAGE, "cnexp.data"), key=lambda name: (LAYOUT_ORDER + (name,)).index(name))})


class Crop(Choice):
    center = "center"
    random = "random"  # training split only, seeded


class ConditionStyle(Choice):
    """data.condition_style: what the tiny world's condition shows of each shape
    (cnexp/tinyworld/styles.py), applied when a condition is loaded."""
    outline = "outline"  # the shape's outline: it fixes the kind
    extent = "extent"  # corner marks of its position and size, the same for every kind
    dotted = "dotted"  # those marks + 7 dots on its outline: the kind, for a model that reads it


class Duplicates(Choice):
    """data.duplicates: samples whose decoded condition and target are identical
    (cnexp/data/check.py). Each such group always lands on one side of a cut split."""
    keep = "keep"  # every copy; refused: the same entry listed twice, a group across given splits
    drop = "drop"  # one copy of each group (a held-out one first), the others left out


class Scheduler(Choice):
    """sampling.scheduler: the evaluation sampler (diffusers' scheduler of that name)."""
    ddim = "ddim"
    unipc = "unipc"
    dpmsolver = "dpmsolver"  # DPM-Solver++ multistep


class CacheStore(Choice):
    """cache.store: where the frozen-encoder cache lives (cnexp/encode_store.py)."""
    disk = "disk"  # memory-mapped shards under cache.dir, reused by later runs
    memory = "memory"  # this process only


class FrozenDtype(Choice):
    """trainer.frozen_dtype: the dtype the frozen base is stored in (cnexp/precision.py)."""
    auto = "auto"  # half per trainer.precision on a GPU, fp32 otherwise
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class PromptSetting(Choice):
    """eval.prompt_settings: the paper's four prompt settings (cnexp/metrics/prompts.py)."""
    none = "none"
    insufficient = "insufficient"
    conflicting = "conflicting"
    perfect = "perfect"


class Fidelity(Choice):
    """eval.fidelity: how control fidelity is scored (cnexp/metrics/fidelity.py)."""
    auto = "auto"  # from data.annotator
    outline = "outline"
    f1 = "f1"
    ssim = "ssim"
    rmse = "rmse"
    miou = "miou"


class OnNonFinite(Choice):
    """trainer.on_nonfinite: what a NaN/inf loss or gradient does."""
    stop = "stop"
    skip = "skip"


class LoggerMode(Choice):
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass(frozen=True)
class Range:
    """A range a field's value must lie in; `why` says what a valid value is (a string, or a
    function of the bad value)."""
    ok: Callable[[Any], bool]
    why: Union[str, Callable[[Any], str]]

    def reason(self, value: Any) -> str:
        return self.why(value) if callable(self.why) else self.why


def in_range(ok: Callable[[Any], bool], why: Union[str, Callable[[Any], str]]) -> dict:
    """Field metadata: `field(default=..., metadata=in_range(lambda v: v > 0, "must be > 0"))`."""
    return {"range": Range(ok, why)}


POSITIVE = in_range(lambda v: v > 0, "must be > 0")
NON_NEGATIVE = in_range(lambda v: v >= 0, "must be >= 0 (0: off)")
PROBABILITY = in_range(lambda v: 0 <= v <= 1, "it is a probability, use a value in [0, 1]")
LEARNING_RATE = in_range(lambda v: v > 0, "the learning rate must be > 0")
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit; Lightning's seed_everything warns past it
SEED = in_range(lambda v: 0 <= v <= MAX_SEED, f"seeds must be in [0, {MAX_SEED}] (the range "
                "numpy and seed_everything accept)")


def _devices_ok(value: Any) -> bool:
    """Lightning's trainer.devices: a count >= 1, -1 (every one), auto, "0,1" or a list of ids."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 1 or value == -1
    if isinstance(value, str):
        return value == "auto" or all(p.strip().isdigit() for p in value.split(","))
    ids = list(value) if not isinstance(value, dict) else []
    return bool(ids) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                             for i in ids)


DEVICES = in_range(_devices_ok, "use a count >= 1, -1 (every device), auto, or a list of device "
                   "ids such as [0,1]")

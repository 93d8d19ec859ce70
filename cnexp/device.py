"""trainer=auto: which device and precision a run trains with (docs/configuration.md).

`trainer.accelerator=auto` is a CUDA GPU when one is visible, else the CPU;
`trainer.precision=auto` is bf16-mixed on a GPU that computes bf16 natively (Ampere and later),
16-mixed on an older GPU, and 32-true on the CPU (bf16 autocast is ~10x slower than fp32 on
the CPUs cnexp is tested on). Explicit values (trainer=cpu, trainer=gpu, an override) pass
through unchanged. `trainer.devices` is never guessed: 1 unless set, because several GPUs
change the ranks, the SLURM tasks per node and the launcher together (docs/slurm.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

AUTO = "auto"
GPU_NAMES = ("gpu", "cuda")


@dataclass(frozen=True)
class Device:
    """What Lightning is given: accelerator, precision and devices with `auto` resolved."""
    accelerator: str
    precision: str
    devices: Any

    @property
    def on_gpu(self) -> bool:
        return self.accelerator in GPU_NAMES


def resolve_device(trainer_cfg) -> Device:
    """trainer.accelerator / precision with `auto` replaced by this machine's choice."""
    accelerator = str(trainer_cfg.accelerator)
    if accelerator == AUTO:
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    precision = str(trainer_cfg.precision)
    if precision == AUTO:
        precision = gpu_precision() if accelerator in GPU_NAMES else "32-true"
    return Device(accelerator, precision, getattr(trainer_cfg, "devices", 1))


def gpu_precision() -> str:
    """bf16-mixed where the GPU has bf16 units, else fp16 autocast with a grad scaler."""
    if not torch.cuda.is_available():  # trainer=gpu without a GPU: Lightning says so
        return "bf16-mixed"
    # emulated bf16 (pre-Ampere) is slower than fp16 and gains nothing
    return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) \
        else "16-mixed"


def describe(device: Device, frozen_dtype: torch.dtype) -> str:
    """The run's first line: what it trains on, in which precision, the frozen base's dtype."""
    if device.on_gpu and torch.cuda.is_available():
        visible = torch.cuda.device_count()
        where = f"{device.devices} x {torch.cuda.get_device_name(0)} ({visible} visible"
        where += (f"; trainer.devices={visible} trainer.strategy=ddp uses all)"
                  if isinstance(device.devices, int) and device.devices < visible else ")")
    elif device.on_gpu:
        where = f"gpu x {device.devices} (no CUDA device visible)"
    else:
        where = f"{device.accelerator} x {device.devices} ({torch.get_num_threads()} torch threads)"
    dtype = str(frozen_dtype).removeprefix("torch.")
    return f"cnexp: device {where}, precision {device.precision}, frozen base {dtype}"

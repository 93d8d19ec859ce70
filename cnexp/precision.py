"""The frozen base in the compute dtype (trainer.frozen_dtype; docs/gpu.md).

Under bf16/fp16 mixed precision every matmul of the frozen UNet, VAE and text encoder runs in half
precision anyway (autocast); holding their weights in fp32 only doubles their memory and adds a
cast per layer per step. What trains keeps fp32 master weights: the control branch, and the UNet
decoder when control.sd_locked=false (a frozen parameter is one with requires_grad=False).
"""
from __future__ import annotations

import contextlib

import torch

from cnexp.device import resolve_device
from cnexp.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the half dtype each Lightning precision computes in (None: fp32 or fully "-true" precisions,
# which convert the whole module themselves)
MIXED = {"bf16-mixed": "bf16", "16-mixed": "fp16"}


def resolve_frozen_dtype(trainer_cfg) -> torch.dtype:
    """trainer.frozen_dtype as a torch dtype; `auto` is half only on a GPU under mixed precision
    (accelerator and precision as trainer=auto resolves them on this machine, cnexp/device.py)."""
    device = resolve_device(trainer_cfg)
    choice, precision = str(trainer_cfg.frozen_dtype), device.precision
    if choice == "auto":
        return DTYPES[MIXED[precision]] if device.on_gpu and precision in MIXED else torch.float32
    if choice not in DTYPES:
        raise ConfigError(f"trainer.frozen_dtype={choice!r} is unknown: use auto, "
                         f"{', '.join(DTYPES)} (python run.py trainer.frozen_dtype=auto)")
    if choice != "fp32" and MIXED.get(precision) != choice:
        need = next(p for p, d in MIXED.items() if d == choice)
        given = str(trainer_cfg.precision)
        given = precision if given == precision else f"{given} (here: {precision})"
        raise ConfigError(f"trainer.frozen_dtype={choice} needs trainer.precision={need} (the "
                         f"trained branch meets the {choice} base under autocast); it is "
                         f"{given}: set trainer.precision={need} or trainer.frozen_dtype=auto")
    return DTYPES[choice]


@torch.no_grad()
def store_frozen(modules, dtype: torch.dtype, copies: dict | None = None) -> None:
    """Cast the frozen parameters (and floating buffers) of `modules` to `dtype`, in place;
    trainable parameters stay as they are (fp32).

    `copies`: {name: (trainable copy, base weight)} (Branch.copied_from_base). The copy was
    taken from the fp32 base; it restarts from the base as stored (a half value is exact in
    fp32), so at step 0 the copy is exactly the base the run computes with and its copy drift
    is 0, as with an fp32 base. The cost: the copy starts rounded to the half dtype (bf16:
    within 2^-9 of each pretrained weight), the precision the base itself runs at."""
    if dtype == torch.float32:
        return
    for module in modules:
        for param in module.parameters():
            if not param.requires_grad:
                param.data = param.data.to(dtype)
        for sub in module.modules():
            for name, buf in sub.named_buffers(recurse=False):
                if buf.is_floating_point():
                    setattr(sub, name, buf.to(dtype))
    for param, base in (copies or {}).values():
        param.copy_(base)  # fp32 <- half: exact


def frozen_autocast(module):
    """Autocast to the frozen base's dtype where it is half: for the code that runs the base
    outside Lightning's training step (sampling, base damage); a no-op for an fp32 base."""
    dtype = module.vae.dtype  # the VAE is frozen whole (an unlocked UNet decoder stays fp32)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(module.device.type, dtype=dtype)

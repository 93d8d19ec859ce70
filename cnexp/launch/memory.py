"""Peak GPU memory and time per step of a run's training step, before it runs, for the base and
branch the run would build (cnexp/launch/geometry.py measures them on the meta device), on the
GPU this machine has or one named (`python -m cnexp.plan --gpu H100 ...`).

Memory per GPU = frozen weights + what trains + activations + overhead:
  frozen       the denoiser, the VAE and the branch's frozen part at trainer.frozen_dtype; the
               text encoders too unless cache.text=true (their embeddings are read from the
               cache, so they are counted off the GPU, as diffusers' scripts move them off)
  trained      fp32 weights 4 + fp32 gradients 4 + AdamW's two fp32 moments 8 = 16 bytes per
               parameter; optim.eight_bit=true: the moments in 8 bits, 10 bytes
  activations  batch x units x bytes per unit, where a network's units are the input elements
               of each Linear and Conv2d for one sample (geometry.py counts them per layer at
               the run's resolution and prompt length). A trained layer stores 34/7 bytes per
               unit: Korthikanti et al. 2022 (arXiv 2205.05198) count 34 bytes per token per
               hidden unit for a transformer layer in 16-bit training, whose Linears read 7 units
               (q, k, v, out: 4 x h; MLP: h + 4h); flash attention keeps no s^2 term. A frozen
               layer keeps less (no input for a weight gradient): C_FROZEN bytes per unit,
               calibrated on diffusers' README_flux.md, which measured ~58 GiB ("58G", in the
               GiB nvidia-smi reports: its ~30G after offloading the text encoders is 29.95 GiB
               of bf16 transformer and VAE and the fp32 4+4-block ControlNet) for
               train_controlnet_flux.py at 512 px, batch 1, bf16, no gradient checkpointing:
               58 GiB - 52.82 GiB (weights, gradients, AdamW) - 1 GiB overhead - 1.66 GiB (the
               ControlNet's 0.367e9 units x 34/7) = 2.52 GiB over the transformer's 2.426e9
               units: 1.12 bytes per unit. (A count of what autograd must keep in a frozen Flux
               block, norms, GELU and attention inputs, gives ~2.6: the figure may not be the
               step's peak; the estimate is as good as that calibration, say +-15 %.) Under
               trainer.precision=32-true every activation byte count doubles. With
               trainer.gradient_checkpointing=true the blocks diffusers checkpoints (resnets,
               transformer blocks) keep only their inputs, and one block at a time recomputes
               its activations in backward.
  overhead     1 GiB: the CUDA context, cuBLAS/cuDNN workspaces, allocator slack.
Evaluation samples between steps through the family's pipeline, which encodes its prompts: the
text encoders are back on the GPU beside the weights and AdamW's state (gradients freed: set to
None); its inference activations, FID's and the CLIP score's models are not counted.

Time per step = FLOPs / (the GPU's dense bf16 peak x MFU), MFU assumed (no measurement here:
`--time-steps N` times real steps on a GPU): 35 % for a transformer denoiser (SD3, Flux: large
matmuls over a thousand tokens and more), 20 % for a UNet (convolutions, group norms and narrow
attention heads keep it further from the tensor cores' peak). FLOPs per sample: the frozen
denoiser's forward and its backward to the activations (2 x its forward: no weight gradients),
the branch's forward and backward (3 x), one more forward of both under gradient checkpointing,
the text encoders' forward (2 x weights x tokens) without cache.text, the VAE's encoder without
cache.latents and, for the families whose control image is a latent (SD3, Flux), once more for
the condition without cache.conditions. Linear and Conv2d FLOPs are counted per layer at the run's shapes, attention as
4 x queries x keys x width.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from cnexp.errors import CnexpError
from cnexp.launch.geometry import Geometry, Network
from cnexp.launch.published import DENOISERS, GPU_ALIASES, GPUS, TEXT_ENCODERS

GiB = 2 ** 30
C_TRAINED = 34 / 7  # bytes per unit of a trained layer (16-bit activations)
C_FROZEN = 1.12  # bytes per unit of a frozen layer: calibrated on Flux's 58 GiB (above)
OVERHEAD = 1.0 * GiB
MFU = {"transformer": 0.35, "unet": 0.20}  # by the bundle's denoiser
TIGHT = 0.9  # above this share of the GPU's memory the plan warns


@dataclass(frozen=True)
class Setting:
    """What the estimate depends on besides the architecture; each lever changes one field."""
    batch: int  # per device
    resolution: int
    frozen_bytes: int
    compute_bytes: int  # 2 under bf16/fp16 mixed precision, 4 under 32-true
    checkpointing: bool
    eight_bit: bool
    cache_text: bool
    cache_latents: bool
    cache_conditions: bool = True  # the condition's latents (families whose control reads them)


@dataclass
class Estimate:
    frozen: float
    text: float  # text encoders on the GPU (cache.text=false)
    trained: float
    activations: float
    overhead: float = OVERHEAD

    @property
    def total(self) -> float:
        return self.frozen + self.text + self.trained + self.activations + self.overhead


def setting_of(cfg: DictConfig, world: int) -> tuple[Setting, str]:
    """The run's setting as it would run on a GPU (trainer=auto resolved for one), and its
    precision's name."""
    from cnexp.device import resolve_device
    from cnexp.precision import resolve_frozen_dtype

    trainer = OmegaConf.merge(cfg.trainer, {"accelerator": "gpu"}) \
        if str(cfg.trainer.accelerator) == "auto" else cfg.trainer
    precision = resolve_device(trainer).precision
    frozen = resolve_frozen_dtype(trainer)
    half = precision.startswith(("bf16", "16"))
    return Setting(max(1, cfg.data.batch_size // max(world, 1)), cfg.data.resolution,
                   frozen.itemsize, 2 if half else 4, bool(cfg.trainer.gradient_checkpointing),
                   bool(cfg.optim.eight_bit), bool(cfg.cache.text),
                   bool(cfg.cache.latents), bool(cfg.cache.conditions)), precision


def network_bytes(net: Network, checkpointing: bool, compute_bytes: int) -> float:
    """Activation bytes of one sample of `net` (16-bit units; x2 in fp32 below)."""
    cost = lambda trained: C_TRAINED if trained else C_FROZEN  # noqa: E731
    full = sum(units * cost(trained) for units, _, trained, _ in net.leaves)
    if not (checkpointing and net.checkpointable and net.blocks):
        return full * compute_bytes / 2
    inside: dict[str, float] = {}
    outside = 0.0
    for units, _, trained, block in net.leaves:
        if block is None:
            outside += units * cost(trained)
        else:
            inside[block] = inside.get(block, 0.0) + units * cost(trained)
    kept = (outside + max(inside.values(), default=0.0)) * compute_bytes / 2
    return kept + sum(net.blocks.values()) * compute_bytes


def estimate(g: Geometry, s: Setting) -> Estimate:
    denoiser = next(g.params[n] for n in DENOISERS if n in g.params)
    trained_in_denoiser = g.trained - (g.params["branch"] - g.frozen_branch)
    frozen = (denoiser - trained_in_denoiser + g.params["vae"] + g.frozen_branch) \
        * s.frozen_bytes
    text = 0 if s.cache_text else sum(g.params[n] for n in TEXT_ENCODERS if n in g.params) \
        * s.frozen_bytes
    trained = g.trained * (4 + 4 + (2 if s.eight_bit else 8))
    acts = s.batch * sum(network_bytes(net, s.checkpointing, s.compute_bytes)
                         for net in (g.denoiser, g.branch))
    return Estimate(frozen, text, trained, acts)


def evaluation_bytes(g: Geometry, s: Setting) -> float:
    """Resident while the evaluation samples (module docstring)."""
    texts = sum(g.params[n] for n in TEXT_ENCODERS if n in g.params) * s.frozen_bytes
    train = estimate(g, s)
    return train.frozen + texts + g.trained * (4 + (2 if s.eight_bit else 8)) + train.overhead


def flops_per_sample(g: Geometry, s: Setting) -> float:
    """Training FLOPs of one sample (module docstring)."""
    total = 2 * g.denoiser.flops + 3 * g.branch.flops
    if s.checkpointing:
        total += g.denoiser.flops + g.branch.flops
    if not s.cache_text:
        total += sum(g.text_flops.values())
    encodes = (0 if s.cache_latents else 1) + \
        (1 if g.latent_control and not s.cache_conditions else 0)
    return total + encodes * g.vae_flops


# ---- the GPU ---------------------------------------------------------------------------------
@dataclass
class Gpu:
    label: str
    memory: float  # bytes
    tflops: Optional[float]  # dense bf16; None: unknown
    how: str


def resolve_gpu(name: Optional[str]) -> Optional[Gpu]:
    """The GPU named (--gpu), else the one this machine has, else None."""
    if name:
        key = GPU_ALIASES.get(name.upper(), name.upper())
        if key not in GPUS:
            raise CnexpError(f"--gpu {name} is not one cnexp knows: use one of "
                             f"{', '.join(GPUS)}")
        label, memory, tflops = GPUS[key]
        return Gpu(label, memory, tflops, "named: --gpu")
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    found = props.name.upper().replace(" ", "")
    key = next((k for k in ("H200", "H100", "L40S", "4090") if k in found), None)
    if key is None and "A100" in found:
        key = "A100-80" if props.total_memory > 60 * GiB else "A100-40"
    key = GPU_ALIASES.get(key, key)
    tflops = GPUS[key][2] if key else None
    return Gpu(props.name, float(props.total_memory), tflops, "this machine's")


# ---- the levers ------------------------------------------------------------------------------
def levers(cfg: DictConfig, s: Setting, world: int) -> list[tuple[str, Setting, bool]]:
    """(override, the setting it gives, whether it changes only memory and time) for each lever
    the run has not pulled yet."""
    found = []
    if s.compute_bytes == 4:
        found.append(("trainer.precision=bf16-mixed trainer.frozen_dtype=bf16",
                      dataclasses.replace(s, compute_bytes=2, frozen_bytes=2), True))
    elif s.frozen_bytes == 4:
        half = "fp16" if str(cfg.trainer.precision).startswith("16") else "bf16"
        found.append((f"trainer.frozen_dtype={half}", dataclasses.replace(s, frozen_bytes=2),
                      True))
    if not s.checkpointing:
        found.append(("trainer.gradient_checkpointing=true",
                      dataclasses.replace(s, checkpointing=True), True))
    if not s.eight_bit:
        found.append(("optim.eight_bit=true", dataclasses.replace(s, eight_bit=True), True))
    if not s.cache_text:
        found.append(("cache.text=true", dataclasses.replace(s, cache_text=True), True))
    if s.batch > 1:
        half, accumulate = s.batch // 2, cfg.trainer.accumulate_grad_batches
        text = f"data.batch_size={half * world} trainer.accumulate_grad_batches={accumulate * 2}"
        found.append((text, dataclasses.replace(s, batch=half), False))
    smaller = max(256, s.resolution * 3 // 4 // 64 * 64)
    if smaller < s.resolution:
        found.append((f"data.resolution={smaller}",
                      dataclasses.replace(s, resolution=smaller), False))
    return found


def gib(n: float) -> str:
    """Bytes in GiB (MiB below one GiB)."""
    return f"{n / GiB:.1f} GiB" if abs(n) >= GiB else f"{n / 2 ** 20:.0f} MiB"


def billions(n: float) -> str:
    """A parameter count: 2.567B, or 1.2M below a billion."""
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"

"""Model FLOPs of one ControlNet training step, and MFU against the chip's dense peak.

Counted with torch.utils.flop_counter.FlopCounterMode on the meta device (shapes only, nothing
computed or allocated), per part of one step as cnexp and diffusers' script execute it:
  vae           the VAE encoder's forward on the batch (skipped per step with cache.latents)
  text_encoder  the text encoder's forward on the batch's 77-token captions (cache.text skips it)
  controlnet    forward + backward (weight and input gradients: it trains)
  unet          the frozen UNet's forward + backward (input gradients only: the residuals'
                gradients flow through it to the ControlNet; no weight gradients)
FlopCounterMode counts matmuls, convolutions and attention (2 FLOPs per multiply-add); norms,
activations and the optimizer step are not counted, as MFU conventionally does not.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

PARTS = ("vae", "text_encoder", "controlnet", "unet")
# dense bf16 tensor-core peaks, TFLOP/s (vendor datasheets; SXM parts). Matched in this order
# against torch.cuda.get_device_name(); anything else (and CPUs) has no MFU.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))


def peak_tflops(device_name: str | None) -> float | None:
    for key, peak in PEAK_BF16_TFLOPS:
        if device_name and key in device_name:
            return peak
    return None


def mfu(flops_per_step: float, step_seconds: float, device_name: str | None,
        precision: str) -> float | None:
    """Model FLOPs utilisation, or None where no bf16 peak applies (CPU, unknown chip, fp32)."""
    peak = peak_tflops(device_name)
    if peak is None or not precision.startswith("bf16") or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (peak * 1e12)


def step_flops(configs: dict, batch: int, resolution: int, tokens: int = 77,
               conditioning_channels=(16, 32, 96, 256)) -> dict[str, float]:
    """FLOPs of one training step per part (see the module docstring), from scaled_configs()."""
    with torch.device("meta"):
        vae = AutoencoderKL(**configs["vae"])
        text = CLIPTextModel(CLIPTextConfig(**configs["text"]))
        unet = UNet2DConditionModel(**configs["unet"])
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=tuple(conditioning_channels),
            load_weights_from_unet=False)
        for frozen in (vae, text, unet):
            frozen.requires_grad_(False)
        factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
        images = torch.empty(batch, 3, resolution, resolution)
        ids = torch.zeros(batch, tokens, dtype=torch.long)
        noisy = torch.empty(batch, 4, resolution // factor, resolution // factor)
        t = torch.zeros(batch, dtype=torch.long)
    counts = {}
    with torch.no_grad():
        counts["vae"] = _count(lambda: vae.encode(images).latent_dist.mean)
        counts["text_encoder"] = _count(lambda: text(ids)[0])
        context = text(ids)[0]
    counter = FlopCounterMode(display=False)
    with counter:
        down, mid = controlnet(noisy, t, encoder_hidden_states=context, controlnet_cond=images,
                               return_dict=False)
        pred = unet(noisy, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        pred.float().square().mean().backward()
    by_module = counter.get_flop_counts()
    counts["controlnet"] = float(sum(by_module.get("ControlNetModel", {}).values()))
    counts["unet"] = float(sum(by_module.get("UNet2DConditionModel", {}).values()))
    return counts


def _count(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def executed(parts: dict[str, float], latents_cached: bool, text_cached: bool) -> float:
    """FLOPs a trainer executes per step: the encoders' share only where it encodes each step."""
    return (parts["controlnet"] + parts["unet"] + (0 if latents_cached else parts["vae"])
            + (0 if text_cached else parts["text_encoder"]))

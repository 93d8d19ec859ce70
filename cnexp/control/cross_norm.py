"""control.connector=cross_norm: ControlNeXt's Cross Normalization (Peng et al. 2024) in place of
zero convolutions. This module holds the normalisation and the wrapper for the branches that
return residuals (copy, scratch, lite, lora_copy); xs.py and t2i_adapter.py subclass the wrapper
for the features they add inside the UNet (their reference m_k: the base feature each XS
connector adds into; the encoder hidden state each adapter feature is added to).

The paper's zero convolutions keep the control from disturbing the base at the start. ControlNeXt
instead aligns the control's features with the frozen model's before adding them: each residual
r_k (the connector's output for skip connection k, or the middle block) is standardised with its
own statistics and given the mean and std of the frozen UNet's feature m_k it is added to,

    r_k' = s_k * ((r_k - mean(r_k)) / (std(r_k) + eps) * std(m_k) + mean(m_k))

with mean/std per sample over (C, h, w), as in ControlNeXt's code, and s_k a learned scale per
residual that starts at control.cross_norm_scale (ControlNeXt: a fixed 1.0). The frozen UNet's
features m_k do not depend on the control (the residuals enter the skips and the middle block,
after the encoder ran), so they come from one no-grad pass of the frozen encoder: conv_in, the
down blocks and the middle block, stopped before the decoder. That pass costs about half a UNet
forward per step, in training and at every sampling step.

The wrapper keeps the branch's network as `network` (what connector_init, only_mid_control and
copy drift act on) and forwards with ControlNetModel's signature, so the training loop and
diffusers' ControlNet pipeline (through MultiControlNetModel) run it unchanged. Export: the
network as its branch exports it, plus `cross_norm.safetensors` ({"scales": (K,), "active":
(K,)}, active 0 for the skips under only_mid_control); `CrossNormControl.from_parts(network,
scales, active, unet)` puts it back (`CrossNormXS`, `CrossNormAdapter` alike, without the unet).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.controlnets.controlnet import ControlNetOutput
from safetensors.torch import load_file, save_file
from torch import nn

from cnexp.errors import CnexpError

SCALES_FILE = "cross_norm.safetensors"
EPS = 1e-6


class _EncoderDone(Exception):
    """Raised by the middle block's hook: the decoder's output is not needed."""


@torch.compiler.disable  # trainer.compile: hooks that stop the UNet early stay eager
@torch.no_grad()
def skip_features(unet: UNet2DConditionModel, sample, timestep, text, **cond):
    """The frozen UNet's own skip-connection features (in the order ControlNetModel returns its
    down residuals) and its middle-block output, for these inputs (`cond`: SDXL's
    added_cond_kwargs)."""
    features: list[torch.Tensor] = []

    def stop(module, inputs, output):
        features.append(output)
        raise _EncoderDone

    hooks = [unet.conv_in.register_forward_hook(lambda m, i, out: features.append(out))]
    hooks += [block.register_forward_hook(lambda m, i, out: features.extend(out[1]))
              for block in unet.down_blocks]
    hooks.append(unet.mid_block.register_forward_hook(stop))
    try:
        unet(sample, timestep, encoder_hidden_states=text, **cond)
    except _EncoderDone:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return features[:-1], features[-1]


def cross_normalize(residual: torch.Tensor, reference: torch.Tensor,
                    scale: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) residual given the per-sample mean and std of the frozen feature."""
    dims = tuple(range(1, residual.ndim))
    mean, std = residual.mean(dims, keepdim=True), residual.std(dims, keepdim=True)
    # the frozen feature only sets the level: no gradient through its statistics (the residual
    # branches' references come from a no-grad pass; XS adds into its reference in place)
    ref = reference.detach().to(residual.dtype)
    ref_mean, ref_std = ref.mean(dims, keepdim=True), ref.std(dims, keepdim=True)
    return scale * ((residual - mean) / (std + EPS) * ref_std + ref_mean)


class CrossNormControl(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, num_residuals: int = 1, initial_scale: float = 1.0,
                 global_pool_conditions: bool = False):  # read by diffusers' ControlNet pipeline
        super().__init__()
        self.scales = nn.Parameter(torch.full((num_residuals,), float(initial_scale)))
        # 0 where the residual must stay exactly zero (only_mid_control: the skips), else 1
        self.register_buffer("active", torch.ones(num_residuals))
        self.network: nn.Module | None = None
        self._unet: list[UNet2DConditionModel] = []  # a list: the frozen UNet is no submodule

    @classmethod
    def from_parts(cls, network: nn.Module, scales: torch.Tensor,
                   active: torch.Tensor | None = None,
                   unet: UNet2DConditionModel | None = None) -> "CrossNormControl":
        wrapper = cls(num_residuals=len(scales))
        with torch.no_grad():
            wrapper.scales.copy_(scales)
            if active is not None:
                wrapper.active.copy_(active)
        wrapper.network = network
        if unet is not None:
            wrapper.attach(unet)
        return wrapper

    def attach(self, unet: UNet2DConditionModel) -> None:
        """The frozen UNet whose statistics normalise the residuals (read, never trained)."""
        self._unet[:] = [unet]

    def forward(self, sample, timestep=None, encoder_hidden_states=None, controlnet_cond=None,
                conditioning_scale: float = 1.0, guess_mode: bool = False,
                return_dict: bool = True, **kwargs):
        if not self._unet:
            raise CnexpError("a cross_norm control network needs the frozen UNet it normalises "
                             "against: call .attach(unet) after loading it")
        down, mid = self.network(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                 controlnet_cond=controlnet_cond, conditioning_scale=1.0,
                                 guess_mode=guess_mode, return_dict=False, **kwargs)
        extra = {k: kwargs[k] for k in ("added_cond_kwargs",) if kwargs.get(k) is not None}
        ref_down, ref_mid = skip_features(self._unet[0], sample, timestep, encoder_hidden_states,
                                          **extra)
        residuals = [cross_normalize(r, f, s) * (on * conditioning_scale) for r, f, s, on
                     in zip([*down, mid], [*ref_down, ref_mid], self.scales, self.active)]
        down, mid = tuple(residuals[:-1]), residuals[-1]
        if not return_dict:
            return down, mid
        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)

    def save_scales(self, directory: Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file({"scales": self.scales.detach().float().cpu().contiguous(),
                   "active": self.active.float().cpu().contiguous()},
                  str(Path(directory) / SCALES_FILE))


def unwrap(control: nn.Module) -> nn.Module:
    """The branch's own network (inside a cross_norm wrapper, if any)."""
    inner = getattr(control, "network", None)
    return control if inner is None else inner


def load_scales(directory: Path) -> dict[str, torch.Tensor] | None:
    """{"scales": (K,), "active": (K,)} of a cross_norm export; None for any other export."""
    path = Path(directory) / SCALES_FILE
    return load_file(str(path)) if path.exists() else None

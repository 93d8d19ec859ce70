"""ControlNet-XS (arXiv 2312.06573) from diffusers: a small control network with two-way
connections to the base, run as one fused `UNetControlNetXSModel` whose base part stays frozen.

Two adaptations make it a fair arm of the comparison:
- diffusers builds its copy of the base's resnets with GroupNorm eps 1e-6 whatever the base's
  `norm_eps` (1e-5 in SD 1.5), so the fused model's base path is not the base. We copy each
  norm's eps from the base, which makes the zero-connector model equal the base exactly.
- diffusers' XS supports bases with 2 layers per block (SD, SDXL) only. A base with 1 layer per
  block (the tiny world) is first widened to 2 by a function-preserving expansion: each new layer
  is an identity (a resnet whose last conv is zero; an attention whose proj_out is zero; in the
  decoder, a 1x1 shortcut that passes the hidden state and ignores the extra skip connection).

control.connector=cross_norm: each control->base conv's output is normalised with the per-sample
statistics of the base feature it is added into, times a learned scale (cross_norm.py):
`CrossNormXS` wraps the fused model and hooks its connectors, so training, the XS pipeline (which
runs the fused model) and a reloaded export all normalise.

Export: the fused model's save_pretrained, `group_norms.json` (diffusers' from_pretrained rebuilds
some GroupNorms with other group counts and eps than the model trained with) and, for cross_norm,
`cross_norm.safetensors`; `get_branch("xs").load(dir)` puts them all back.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (ControlNetXSAdapter, StableDiffusionControlNetXSPipeline,
                       UNet2DConditionModel, UNetControlNetXSModel)
from diffusers.utils import logging as diffusers_logging
from torch import nn

from cnexp.config import ControlConfig
from cnexp.control.branch import Branch, conditioning_kwargs, register
from cnexp.control.cross_norm import CrossNormControl, cross_normalize, load_scales, unwrap
from cnexp.errors import CnexpError, ConfigError
from cnexp.fileio import atomic_write_json

NORMS_FILE = "group_norms.json"  # {GroupNorm name: [num_groups, eps]} of the exported model


@register
class XSBranch(Branch):
    """Base and control run as one fused model (the pipeline's UNet); no residuals."""
    name = "xs"
    model_class = UNetControlNetXSModel
    warned = False  # diffusers' deprecation warning of the XS pipeline was shown

    def build(self, unet, cfg) -> UNetControlNetXSModel:
        return build_xs(unet, cfg)

    def connectors(self, control: nn.Module) -> list[nn.Conv2d]:
        """Every control->base conv (control_to_base_for_conv_in, *.ctrl_to_base); the
        base->control convs keep diffusers' zero init."""
        return [m for name, m in unwrap(control).named_modules() if isinstance(m, nn.Conv2d)
                and ("ctrl_to_base" in name or "control_to_base" in name)]

    def down_connectors(self, control: nn.Module) -> list[nn.Conv2d]:
        raise ConfigError("control.branch=xs has no skip-connection residuals")  # see check()

    def predict(self, unet, control, noisy, t, cond, condition, conditioning_scale=1.0):
        cond = conditioning_kwargs(cond)
        return control(noisy, t, **cond, controlnet_cond=condition,
                       conditioning_scale=conditioning_scale, return_dict=False)[0]

    def pipeline(self, unet, control, **parts) -> StableDiffusionControlNetXSPipeline:
        """diffusers' XS pipeline with the fused model as its UNet. diffusers warns at every
        construction that this pipeline is deprecated; once will do."""
        verbosity = diffusers_logging.get_verbosity()
        if self.warned:
            diffusers_logging.set_verbosity_error()
        try:
            return StableDiffusionControlNetXSPipeline(unet=unwrap(control), controlnet=None,
                                                       **parts)
        finally:
            diffusers_logging.set_verbosity(verbosity)
            XSBranch.warned = True

    def wrap_cross_norm(self, control, unet, cfg) -> CrossNormXS:
        scales = torch.full((len(self.connectors(control)),), float(cfg.cross_norm_scale))
        return CrossNormXS.from_parts(control, scales).train(control.training)

    def export(self, control, directory: Path) -> None:
        if isinstance(control, CrossNormXS):
            control.save_scales(directory)
        fused = unwrap(control)
        fused.save_pretrained(directory)
        # the config does not rebuild the norms as built: diffusers' from_config gives the
        # control part other group counts than from_unet did, and match_norm_eps's eps is lost
        atomic_write_json(Path(directory) / NORMS_FILE, {
            name: [m.num_groups, m.eps] for name, m in fused.named_modules()
            if isinstance(m, nn.GroupNorm)})

    def load(self, directory: Path) -> nn.Module:
        """The export as trained (UNetControlNetXSModel.from_pretrained alone computes another
        function: see export)."""
        fused = UNetControlNetXSModel.from_pretrained(directory)
        norms_file = Path(directory) / NORMS_FILE
        if norms_file.exists():  # older exports load as diffusers builds them, as before
            norms = json.loads(norms_file.read_text())
            for name, norm in fused.named_modules():
                if name in norms:
                    norm.num_groups, norm.eps = norms[name]
        parts = load_scales(directory)
        return fused if parts is None else CrossNormXS.from_parts(fused, **parts)

    def check(self, cfg: ControlConfig) -> None:
        if cfg.only_mid_control or not cfg.sd_locked:
            raise ConfigError("control.branch=xs has no residuals and holds its own copy of the "
                              "base, so control.only_mid_control=true and control.sd_locked=false "
                              "do not apply to it; use control.branch=copy|lite|scratch")


class CrossNormXS(CrossNormControl):
    """The fused model whose control->base convs return their output cross-normalised against
    the base feature it is added into (hooks on the fused model: its pipeline runs them too)."""

    def forward(self, *args, **kwargs):
        return self.network(*args, **kwargs)

    @classmethod
    def from_parts(cls, network, scales, active=None, unet=None) -> "CrossNormXS":
        wrapper = super().from_parts(network, scales, active)
        hook_connectors(wrapper)
        return wrapper


def reference_points(fused: UNetControlNetXSModel) -> list[tuple[nn.Conv2d, nn.Module, str]]:
    """(control->base conv, base module, "output" | "input"): where the base feature that conv's
    output is added into comes from - that module's output, or (an up block's first layer) the
    up block's input. Mirrors the additions in diffusers' fused forward."""
    def last_layer(attention, resnet):
        return resnet if attention is None else attention

    points = [(fused.control_to_base_for_conv_in, fused.base_conv_in, "output")]
    for block in fused.down_blocks:
        for j, resnet in enumerate(block.base_resnets):
            points.append((block.ctrl_to_base[j], last_layer(block.base_attentions[j], resnet),
                           "output"))
        if block.base_downsamplers is not None:
            points.append((block.ctrl_to_base[-1], block.base_downsamplers, "output"))
    points.append((fused.mid_block.ctrl_to_base, fused.mid_block.base_midblock, "output"))
    for block in fused.up_blocks:
        points.append((block.ctrl_to_base[0], block, "input"))
        for j in range(1, len(block.ctrl_to_base)):
            points.append((block.ctrl_to_base[j],
                           last_layer(block.attentions[j - 1], block.resnets[j - 1]), "output"))
    return points


def hook_connectors(wrapper: CrossNormXS) -> None:
    """Connector k's output becomes cross_normalize(output, base feature, scales[k]); the fused
    forward then adds it (times conditioning_scale) as before."""
    fused = wrapper.network
    if getattr(fused, "cross_norm_hooked", False):  # a second set would normalise twice
        raise CnexpError("this UNetControlNetXSModel already has cross_norm hooks: wrap a "
                         "freshly built or loaded model (get_branch('xs').load(dir))")
    fused.cross_norm_hooked = True
    order = {conv: k for k, conv in enumerate(XSBranch().connectors(fused))}
    points = reference_points(fused)
    assert sorted(order[conv] for conv, _, _ in points) == list(range(len(order))), \
        "diffusers' fused XS model changed: its connectors no longer match reference_points"
    references: dict[int, torch.Tensor] = {}  # k -> the base feature, until connector k runs

    def first(value):
        return value[0] if isinstance(value, tuple) else value

    for conv, source, where in points:
        k = order[conv]
        if where == "input":
            source.register_forward_pre_hook(
                lambda m, args, kwargs, k=k: references.__setitem__(
                    k, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]),
                with_kwargs=True)
        else:
            source.register_forward_hook(
                lambda m, args, out, k=k: references.__setitem__(k, first(out)))
        conv.register_forward_hook(lambda m, args, out, k=k: cross_normalize(
            out, references.pop(k), wrapper.scales[k]))


def build_xs(unet: UNet2DConditionModel, cfg: ControlConfig) -> UNetControlNetXSModel:
    """The fused base + XS adapter; only the adapter's parameters are trainable."""
    if unet.config.in_channels != 4:
        raise ConfigError(f"control.branch=xs needs a base with 4-channel latents (diffusers' "
                          f"ControlNet-XS supports SD-style bases only); this base's UNet has "
                          f"in_channels={unet.config.in_channels}. Use "
                          f"control.branch=copy|lite|scratch")
    if unet.config.layers_per_block not in (1, 2):
        raise ConfigError(f"control.branch=xs supports bases with 1 or 2 layers per block; this "
                          f"base has layers_per_block={unet.config.layers_per_block}")
    base = unet if unet.config.layers_per_block == 2 else expand_to_two_layers(unet)
    adapter = ControlNetXSAdapter.from_unet(
        base, size_ratio=cfg.xs_size_ratio, conditioning_channels=cfg.conditioning_channels,
        conditioning_embedding_out_channels=tuple(cfg.conditioning_embedding_out_channels))
    fused = UNetControlNetXSModel.from_unet(base, adapter)
    match_norm_eps(fused, base)
    fused.freeze_unet_params()
    return fused.train()


def _norms(module: nn.Module) -> list[nn.GroupNorm]:
    return [m for m in module.modules() if isinstance(m, nn.GroupNorm)]


def match_norm_eps(fused: UNetControlNetXSModel, base: UNet2DConditionModel) -> None:
    """Give every GroupNorm of the fused model's base part the eps of the base's own norm."""
    pairs = [(f.base_resnets, b.resnets) for f, b in zip(fused.down_blocks, base.down_blocks)]
    pairs += [(f.base_attentions, b.attentions) for f, b in zip(fused.down_blocks, base.down_blocks)
              if hasattr(b, "attentions")]
    pairs += [(fused.mid_block.base_midblock, base.mid_block)]
    pairs += [(f.resnets, b.resnets) for f, b in zip(fused.up_blocks, base.up_blocks)]
    pairs += [(f.attentions, b.attentions) for f, b in zip(fused.up_blocks, base.up_blocks)
              if hasattr(b, "attentions")]
    pairs += [(fused.base_conv_norm_out, base.conv_norm_out)]
    for fused_part, base_part in pairs:
        fused_norms, base_norms = _norms(fused_part), _norms(base_part)
        assert len(fused_norms) == len(base_norms), "fused XS model does not mirror the base"
        for f, b in zip(fused_norms, base_norms):
            assert f.num_channels == b.num_channels
            f.eps = b.eps


@torch.no_grad()
def expand_to_two_layers(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A copy of a 1-layer-per-block UNet with 2 layers per block that computes the same
    function: every added layer is an identity (see the module docstring)."""
    wide = UNet2DConditionModel.from_config({**unet.config, "layers_per_block": 2})
    wide.to(unet.dtype).eval()
    state = wide.state_dict()
    source = unet.state_dict()
    for key, value in source.items():
        state[_wide_key(key)] = value
    wide.load_state_dict(state)
    for block in wide.down_blocks:  # layer 1 of each encoder block: identity
        _identity_resnet(block.resnets[1])
        if hasattr(block, "attentions"):
            _identity_attention(block.attentions[1])
    for block in wide.up_blocks:  # layer 1 of each decoder block: identity that skips its skip
        _identity_resnet(block.resnets[1])
        if hasattr(block, "attentions"):
            _identity_attention(block.attentions[1])
    wide.requires_grad_(False)
    return wide


def _wide_key(key: str) -> str:
    """Where a 1-layer UNet's parameter goes in the 2-layer UNet: encoder layer 0 stays 0;
    decoder layers 0, 1 become 0, 2 (the new identity layer sits in between)."""
    parts = key.split(".")
    if parts[0] == "up_blocks" and parts[2] in ("resnets", "attentions") and parts[3] == "1":
        parts[3] = "2"
    return ".".join(parts)


def _identity_resnet(resnet) -> None:
    nn.init.zeros_(resnet.conv2.weight)  # the residual branch adds an exact zero
    nn.init.zeros_(resnet.conv2.bias)
    if resnet.conv_shortcut is not None:  # decoder: [hidden | skip] -> hidden
        weight = torch.zeros_like(resnet.conv_shortcut.weight)  # (C_out, C_out + C_skip, 1, 1)
        weight[:, :weight.shape[0], 0, 0] = torch.eye(weight.shape[0])
        resnet.conv_shortcut.weight.copy_(weight)
        nn.init.zeros_(resnet.conv_shortcut.bias)


def _identity_attention(transformer) -> None:
    nn.init.zeros_(transformer.proj_out.weight)  # output = residual + 0
    nn.init.zeros_(transformer.proj_out.bias)

"""Flux's control branches: diffusers' FluxControlNetModel (InstantX's design, the network
diffusers' train_controlnet_flux.py trains) on the frozen FluxTransformer2DModel.

The network is a shortened copy of the transformer: its input embeddings, the first N double-
stream and M single-stream blocks (FluxControlNetModel.from_transformer), plus

  controlnet_x_embedder        Linear(packed control latents) added to the embedded noisy latents
                               (the hint: control.init_scope=connectors_and_hint)
  controlnet_blocks[i]         Linear per copied double block  } the connectors: what they return
  controlnet_single_blocks[j]  Linear per copied single block  } is added to the transformer's
                                                                 image tokens, each sample to a
                                                                 run of ceil(19 / N) blocks

diffusers zero-initialises all three (zero_module), the paper's zero convolutions: the
transformer adds exact zeros, so step 0 is the base and the copy's gradient reaches it only
through the connectors, as in the paper.

  copy     N, M = 4, 4 (train_controlnet_flux.py's defaults), weights copied
  scratch  the same network, random weights (load_weights_from_transformer=False)
  lite     N, M = 1, 0, weights copied: the light analog. SD's lite replaces the encoder copy by
           one conv per block; a Flux block has no cheaper stand-in that still reads text and
           timestep, so lite keeps the smallest copy that still steers every block (one double
           block whose sample the transformer adds to all its double blocks, none single)
N and M are capped at the base's own counts (the tiny bundle has 1 and 1).

Latents stay (B, C, h, w) outside, as for the UNet families: `denoise` packs 2x2 patches into
tokens (B, h/2 * w/2, 4C), builds their position ids and unpacks the prediction, so the loss is
the same in either layout.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxTransformer2DModel
from torch import nn

from cnexp.control.branch import Branch, copied_by_name
from cnexp.errors import ConfigError

PEER_LAYERS = (4, 4)  # train_controlnet_flux.py: --num_double_layers, --num_single_layers
LITE_LAYERS = (1, 0)
MAX_T5_TOKENS = 512  # FluxPipeline's max_sequence_length limit (and FLUX.1-dev's default)
TIMESTEP_SCALE = 1000  # Flux's transformer reads t / 1000 and scales it back itself


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2x2 patch one token (channel, row, col order),
    the layout FluxPipeline feeds the transformer."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ConfigError(f"data.resolution: Flux packs 2x2 latent patches, so the latents must "
                          f"have even sides; they are {h}x{w}: use a resolution that is a "
                          "multiple of twice the VAE's downsampling factor (16 for FLUX.1)")
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2)  # (B, C, h/2, 2, w/2, 2)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """pack_latents' inverse: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, width = tokens.shape
    patches = tokens.reshape(b, h // 2, w // 2, width // 4, 2, 2)  # (B, h/2, w/2, C, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, width // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) position ids of the packed tokens of (h, w) latents: (0, row, column)."""
    rows, cols = torch.meshgrid(torch.arange(h // 2, device=device),
                                torch.arange(w // 2, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(dtype)


def t5_length(tokenizer) -> int:
    """The T5 token count prompts are padded to: the pipeline's 512, or the tokenizer's own
    maximum if smaller (the tiny bundle's 32); training and sampling use the same."""
    return min(MAX_T5_TOKENS, tokenizer.model_max_length)


@contextlib.contextmanager
def quiet_pos_embed():
    """FluxControlNetModel builds its FluxPosEmbed through a path diffusers itself deprecates: a
    FutureWarning per network built or loaded that no cnexp user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`FluxPosEmbed` is deprecated", FutureWarning)
        yield


def denoise(transformer: FluxTransformer2DModel, noisy: torch.Tensor, t: torch.Tensor,
            cond: dict, **control_samples) -> torch.Tensor:
    """The transformer's prediction (B, C, h, w) for noisy latents (B, C, h, w) at timesteps t
    (B,) on the schedule's 0..1000 scale; `cond`: the family's conditioning (text, ids,
    guidance); `control_samples`: what a FluxControlNetModel returned, if any."""
    tokens = pack_latents(noisy)  # (B, h/2 * w/2, 4C)
    out = transformer(hidden_states=tokens, timestep=t / TIMESTEP_SCALE, return_dict=False,
                      **cond, **control_samples)[0]
    return unpack_latents(out, *noisy.shape[-2:])


class FluxBranch(Branch):
    """A FluxControlNetModel of `layers` (double, single) copied blocks."""
    model_class = FluxControlNetModel
    layers: tuple[int, int] = PEER_LAYERS
    copy_weights = True

    def build(self, transformer, cfg) -> FluxControlNetModel:
        config = transformer.config
        with quiet_pos_embed():
            control = FluxControlNetModel.from_transformer(
                transformer, num_layers=min(self.layers[0], config.num_layers),
                num_single_layers=min(self.layers[1], config.num_single_layers),
                attention_head_dim=config.attention_head_dim,
                num_attention_heads=config.num_attention_heads,
                load_weights_from_transformer=self.copy_weights)
        return control.requires_grad_(True)

    def load(self, directory: Path) -> FluxControlNetModel:
        with quiet_pos_embed():
            return FluxControlNetModel.from_pretrained(directory)

    def connectors(self, control) -> list[nn.Linear]:
        return [*control.controlnet_blocks, *control.controlnet_single_blocks]

    def down_connectors(self, control) -> list[nn.Linear]:
        return []  # no skip connections: check() refuses control.only_mid_control

    def hint_conv(self, control) -> nn.Linear:
        return control.controlnet_x_embedder

    def predict(self, transformer, control, noisy, t, cond, condition, conditioning_scale=1.0):
        """`condition`: the packed control latents (FluxFamily.control_input)."""
        blocks, singles = control(hidden_states=pack_latents(noisy), controlnet_cond=condition,
                                  conditioning_scale=conditioning_scale,
                                  timestep=t / TIMESTEP_SCALE, return_dict=False, **cond)
        return denoise(transformer, noisy, t, cond, controlnet_block_samples=blocks,
                       controlnet_single_block_samples=singles)

    def pipeline(self, transformer, control, pipeline_class=FluxControlNetPipeline, **parts):
        return pipeline_class(transformer=transformer, controlnet=control, **parts)

    def sampling_inputs(self, pipe, conditions, conditioning_scale) -> dict:
        return {"control_image": conditions, "controlnet_conditioning_scale": conditioning_scale,
                "max_sequence_length": t5_length(pipe.tokenizer_2)}

    def copied_from_base(self, control, transformer) -> dict:
        if not self.copy_weights:
            return {}
        # from_transformer copies the embeddings and the first blocks under the transformer's
        # own names; the connectors and controlnet_x_embedder are the network's own
        return copied_by_name(control, transformer)

    def check(self, cfg) -> None:
        refused = [
            (not cfg.sd_locked, "control.sd_locked=false", "Flux's transformer has no UNet "
             "decoder to unlock; set control.sd_locked=true"),
            (cfg.only_mid_control, "control.only_mid_control=true", "Flux's transformer has no "
             "middle block or skip connections; set control.only_mid_control=false"),
            (getattr(cfg, "connector", "conv") == "cross_norm", "control.connector=cross_norm",
             "cross_norm normalises with a UNet's feature statistics (not built for Flux's "
             "tokens); set control.connector=conv"),
            (cfg.conditioning_channels != 3, f"control.conditioning_channels="
             f"{cfg.conditioning_channels}", "Flux's ControlNet reads the condition through the "
             "RGB VAE; set control.conditioning_channels=3"),
        ]
        for bad, knob, why in refused:
            if bad:
                raise ConfigError(f"{knob} does not apply on base.family=flux: {why}")


class CopyBranch(FluxBranch):
    name = "copy"


class ScratchBranch(FluxBranch):
    name = "scratch"
    copy_weights = False


class LiteBranch(FluxBranch):
    name = "lite"
    layers = LITE_LAYERS


BRANCHES = {branch.name: branch for branch in (CopyBranch(), ScratchBranch(), LiteBranch())}
NOT_HERE = {  # the other control.branch values, and why they do not run on Flux
    "xs": "ControlNet-XS interleaves a UNet encoder with the base's (diffusers has no Flux "
          "version)",
    "t2i_adapter": "a T2I-Adapter adds features to a UNet's encoder blocks, which Flux lacks",
    "lora_copy": "cnexp's lora_copy puts LoRA on ControlNetModel's UNet-encoder copy, not built "
                 "for FluxControlNetModel",
}


def flux_branch(name: str) -> FluxBranch:
    """The Flux branch `name`; one ConfigError naming the Flux branches otherwise."""
    if name not in BRANCHES:
        why = NOT_HERE.get(name, "no Flux version of it is built")
        raise ConfigError(f"control.branch={name} does not run on base.family=flux: {why}; use "
                          f"one of {', '.join(BRANCHES)}")
    return BRANCHES[name]

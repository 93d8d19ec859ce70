"""The control branches on an SD3 / SD3.5 transformer: diffusers' SD3ControlNetModel.

SD3ControlNetModel is a stack of the transformer's own joint blocks: the noisy latents' patch
embedding plus `pos_embed_input` (a patch embedding of the condition's VAE latents) enter it,
with the timestep, the pooled text and the text tokens; after each block a Linear connector
(`controlnet_blocks[i]`) gives one residual, which the frozen transformer adds to the image
tokens of every block in its i-th share of the depth. Names as in control.branch:

  copy      from_transformer: the patch, time/text embeddings and the first COPY_BLOCKS joint
            blocks copied (the paper's trainable copy; diffusers' from_transformer default, which
            train_controlnet_sd3.py uses)
  scratch   the same architecture, its weights random (diffusers' own init), not copied
  lite      from_transformer with LITE_BLOCKS = 1 copied block: the light analog. ControlNet-lite
            keeps the interface (one residual per block of the base, zero connectors) and drops
            the copy's depth; a transformer has no cheap per-block conv to replace its blocks
            with, so the analog is the shallowest copy: one joint block, whose one residual
            steers every block of the transformer

Connectors (control.connector_init) are `controlnet_blocks`; the hint (control.init_scope=
connectors_and_hint) is `pos_embed_input.proj`, the condition's patch conv. diffusers zero-
initialises both (zero_module, in __init__ and again in from_transformer), so with the paper's
zero init step 0 is exactly the base and the copy starts at the base's weights.

The exported network sets force_zeros_for_pooled_projection=false: diffusers' pipeline then
hands it the pooled text and the VAE-shifted control latents, as cnexp trains it (with true, the
InstantX convention, it would get zeros and unshifted latents). Refused on SD3 (check_knobs,
sd3_branch): the UNet's knobs (sd_locked=false, only_mid_control), connector=cross_norm, and the
UNet-only branches xs, t2i_adapter and lora_copy.
"""
from __future__ import annotations

from types import SimpleNamespace

from diffusers import SD3ControlNetModel, SD3Transformer2DModel, StableDiffusion3ControlNetPipeline
from torch import nn

from cnexp.control.branch import Branch, copied_by_name
from cnexp.errors import ConfigError

T5_TOKENS = 256  # the SD3 pipelines' default max_sequence_length: what sampling encodes
# a bundle without T5 (tiny_dit): no zero rows in its place. The pipeline's 256 zero rows would
# be 256 constant tokens the joint attention attends to every step (4x the image's 64 in the
# tiny world); sampling passes the same max_sequence_length (SD3CopyBranch.sampling_inputs)
NO_T5_TOKENS = 0

COPY_BLOCKS = 12  # diffusers' from_transformer default (half of SD3 Medium's 24 blocks)
LITE_BLOCKS = 1
NOT_ON_SD3 = {
    "xs": "ControlNet-XS is built for UNets (cnexp builds it for SD 1.5/2.1 only)",
    "t2i_adapter": "T2I-Adapter adds to UNet encoder features, which a transformer has not",
    "lora_copy": "cnexp's LoRA copy wraps ControlNetModel's UNet encoder, not SD3's blocks",
}


def copied_blocks(transformer: SD3Transformer2DModel, wanted: int) -> int:
    """How many joint blocks a branch copies: `wanted`, at most all but the transformer's last
    (its last block is context_pre_only, another shape than the control net's blocks)."""
    return max(1, min(wanted, transformer.config.num_layers - 1))


class SD3CopyBranch(Branch):
    name = "copy"
    model_class = SD3ControlNetModel
    copy_weights = True
    blocks = COPY_BLOCKS

    def build(self, transformer: SD3Transformer2DModel, cfg) -> SD3ControlNetModel:
        # from_transformer writes num_layers into the config it is given: hand it a copy, so
        # the frozen transformer's own config stays as loaded
        view = SimpleNamespace(config=dict(transformer.config), **{
            part: getattr(transformer, part)
            for part in ("pos_embed", "time_text_embed", "context_embedder", "transformer_blocks")})
        control = SD3ControlNetModel.from_transformer(
            view, num_layers=copied_blocks(transformer, self.blocks),
            num_extra_conditioning_channels=0, load_weights_from_transformer=self.copy_weights)
        control.register_to_config(force_zeros_for_pooled_projection=False)
        return control.requires_grad_(True)

    def connectors(self, control: SD3ControlNetModel) -> list[nn.Linear]:
        return list(control.controlnet_blocks)

    def down_connectors(self, control: SD3ControlNetModel) -> list[nn.Linear]:
        return []  # control.only_mid_control is refused (check)

    def hint_conv(self, control: SD3ControlNetModel) -> nn.Conv2d:
        return control.pos_embed_input.proj

    def predict(self, unet, control, noisy, t, cond, condition, conditioning_scale=1.0):
        """`cond`: the family's {"encoder_hidden_states", "pooled_projections"}; `condition`:
        the condition's latents (B, C, h, w) (the family's control_input)."""
        residuals = control(hidden_states=noisy, controlnet_cond=condition, timestep=t,
                            conditioning_scale=conditioning_scale, return_dict=False, **cond)[0]
        return unet(hidden_states=noisy, timestep=t, block_controlnet_hidden_states=residuals,
                    return_dict=False, **cond)[0]

    def pipeline(self, unet, control, pipeline_class=StableDiffusion3ControlNetPipeline,
                 **parts) -> StableDiffusion3ControlNetPipeline:
        return pipeline_class(transformer=unet, controlnet=control, **parts)

    def sampling_inputs(self, pipe, conditions, conditioning_scale) -> dict:
        tokens = T5_TOKENS if pipe.text_encoder_3 is not None else NO_T5_TOKENS  # as trained
        return {"control_image": conditions, "controlnet_conditioning_scale": conditioning_scale,
                "max_sequence_length": tokens}

    def copied_from_base(self, control, unet):
        if not self.copy_weights:
            return {}
        # from_transformer copies pos_embed, time_text_embed, context_embedder and the first
        # blocks under the transformer's own names; connectors and pos_embed_input are its own
        return copied_by_name(control, unet)

    def check(self, cfg) -> None:
        check_knobs(cfg)


class SD3ScratchBranch(SD3CopyBranch):
    name = "scratch"
    copy_weights = False


class SD3LiteBranch(SD3CopyBranch):
    name = "lite"
    blocks = LITE_BLOCKS


SD3_BRANCHES = {b.name: b() for b in (SD3CopyBranch, SD3ScratchBranch, SD3LiteBranch)}


def sd3_branch(name: str) -> Branch:
    """control.branch `name` as built on an SD3 transformer; ConfigError for the others."""
    if name in SD3_BRANCHES:
        return SD3_BRANCHES[name]
    why = NOT_ON_SD3.get(name, "no such branch on SD3")
    raise ConfigError(f"control.branch={name} does not run on base.family=sd3: {why}; use one "
                      f"of {', '.join(SD3_BRANCHES)} (SD3ControlNetModel: copy, its random-init "
                      f"twin scratch, lite with {LITE_BLOCKS} copied block)")


def check_knobs(cfg) -> None:
    """The control knobs that act on a UNet, or on a UNet branch, and not on SD3."""
    refused = [
        (not cfg.sd_locked, ("control.sd_locked=false trains the UNet decoder, which a "
                             "transformer has not; set control.sd_locked=true")),
        (cfg.only_mid_control, ("control.only_mid_control=true keeps a UNet's skip residuals at "
                                "zero; SD3's residuals are per block, none is a middle block: "
                                "set control.only_mid_control=false")),
        (getattr(cfg, "connector", "conv") == "cross_norm",
         ("control.connector=cross_norm normalises with UNet feature statistics that cnexp "
          "reads from UNet blocks only; set control.connector=conv")),
    ]
    for bad, why in refused:
        if bad:
            raise ConfigError(f"base.family=sd3: {why}")

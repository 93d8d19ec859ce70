"""Load the frozen text-to-image base (a diffusers bundle) from a hub id or a directory."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from cnexp.config import BaseConfig
from cnexp.errors import CnexpError


class BaseModelUnavailable(CnexpError):
    pass


@dataclass
class BaseBundle:
    """The frozen parts of a Stable Diffusion-style pipeline, plus its training noise schedule."""
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    source: str

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def latent_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _unavailable(source: str, why: str) -> BaseModelUnavailable:
    return BaseModelUnavailable(
        f"Cannot load the base model '{source}': {why}\n"
        "  - online: check the hub id (and accept its licence / log in if it is gated);\n"
        "  - offline: download it once and point to it with base.pretrained=/path/to/bundle "
        "(a directory with model_index.json);\n"
        "  - or run the offline tiny world: python run.py base=tiny")


def load_base(cfg: BaseConfig) -> BaseBundle:
    """Load and freeze the base: no gradients, eval mode. Fails with one clear message."""
    source = cfg.pretrained
    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").exists():
            raise _unavailable(source, "the directory has no model_index.json, so it is not a "
                               "diffusers pipeline bundle")
        source = str(local)
    elif local.is_absolute() or source.startswith((".", "~")) or source.count("/") != 1:
        raise _unavailable(source, "no such directory, and it is not a hub id of the form owner/name")
    # Offline, the hub client retries for ~25 s before failing; look in the local cache only.
    kwargs = {"revision": cfg.revision, "local_files_only": local.is_dir() or _offline()}
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=cfg.variant,
                                                    **kwargs)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", variant=cfg.variant, **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
    except (OSError, ValueError) as err:  # hub unreachable, gated, missing files
        hint = ("the hub is unreachable and it is not in the local cache"
                if kwargs["local_files_only"] and not local.is_dir() else str(err).splitlines()[0])
        raise _unavailable(cfg.pretrained, hint) from None
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
        model.eval()
    return BaseBundle(vae, text_encoder, tokenizer, unet, noise_scheduler, source)


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return True
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
        return False
    except OSError:
        return True


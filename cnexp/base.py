"""The frozen text-to-image base: its bundle, loading it by its family (cnexp/families/), and
whether the hub can be reached."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from typing import TYPE_CHECKING

from cnexp.errors import CnexpError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from cnexp.config import BaseConfig

log = logging.getLogger("cnexp")


class BaseModelUnavailable(CnexpError):
    pass


@dataclass
class BaseBundle:
    """The frozen parts of a diffusion pipeline, plus its training noise schedule; `family`
    (cnexp/families/) says how they are used. `unet` is the denoiser whatever its kind (SD3's
    and Flux's transformer too: checkpoint keys and the branches' signatures name it so);
    `extra` holds the components past the first text encoder (text_encoder_2, tokenizer_2, ...)
    under the names diffusers' pipelines give them."""
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    source: str
    family: str = "sd"
    extra: dict = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def latent_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def unavailable(source: str, why: str) -> BaseModelUnavailable:
    return BaseModelUnavailable(
        f"Cannot load the base model '{source}': {why}\n"
        "  - online: check the hub id (and accept its licence / log in if it is gated);\n"
        "  - offline: download it once and point to it with base.pretrained=/path/to/bundle "
        "(a directory with model_index.json);\n"
        "  - or run the offline tiny world: python run.py base=tiny")


def load_base(cfg: BaseConfig) -> BaseBundle:
    """Load and freeze the base as its family does (base.family; cnexp/families/): no
    gradients, eval mode. Fails with one clear message."""
    from cnexp.families.family import get_family

    return get_family(getattr(cfg, "family", None)).load(cfg)


HUB_TIMEOUT_S = 10  # one HEAD; a compute node with no route fails in milliseconds or here
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def use_local_cache(repo_id: str, revision: str | None = None) -> bool:
    """False when the hub answers (asked as huggingface_hub asks: HF_HUB_OFFLINE, HF_ENDPOINT,
    proxies); True when it does not but the bundle is in the local hub cache; otherwise one
    error now, rather than the hub client's ~25 s of retries and a traceback."""
    reachable, why = hub_reachable(repo_id)
    if reachable:
        return False
    if not in_hub_cache(repo_id, revision):
        raise unavailable(repo_id, "the hub is unreachable and it is not in the local cache "
                           f"({hub_cache_dir()}); the hub: {why}")
    log.info("the hub is unreachable (%s): loading %s from the local cache", why, repo_id)
    return True


def hub_offline_by_env() -> bool:
    """HF_HUB_OFFLINE, as huggingface_hub reads it (also when set after it was imported)."""
    from huggingface_hub import constants

    return constants.is_offline_mode() or \
        os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES


def hub_reachable(repo_id: str) -> tuple[bool, str]:
    """(whether the hub answers, why not). Asked with huggingface_hub's own HTTP client, so
    HF_HUB_OFFLINE, HF_ENDPOINT and the proxy variables (HTTPS_PROXY, NO_PROXY, ...) decide as
    they decide every download; any HTTP answer counts (a gated or missing repo is the load's
    error to report, with its own message)."""
    if hub_offline_by_env():
        return False, "HF_HUB_OFFLINE is set"
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    url = f"{constants.ENDPOINT}/api/models/{repo_id}"
    try:
        get_session().head(url, timeout=HUB_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - no answer, whatever the transport says
        proxy = next((os.environ[v] for v in PROXY_VARIABLES if os.environ.get(v)), "")
        if proxy:  # host and port only: a proxy URL may carry a password
            proxy = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        via = f" via proxy {proxy.hostname}:{proxy.port}" if proxy else ""
        detail = (str(err).splitlines() or [""])[0]
        return False, f"{url}{via}: {type(err).__name__} {detail}".rstrip()
    return True, ""


def in_hub_cache(repo_id: str, revision: str | None = None,
                 probe_file: str = "model_index.json") -> bool:
    """Whether the hub cache (HF_HUB_CACHE / HF_HOME) holds the repo's `probe_file` (a diffusers
    bundle's index by default; config.json for a transformers model such as the CLIP score's)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, probe_file, revision=revision), str)


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE

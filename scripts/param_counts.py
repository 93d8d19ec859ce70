"""Trainable parameters of every preset's control branch, on the tiny world and at SD 1.5's shapes.

    python scripts/param_counts.py [PRESET[,OVERRIDE...] ...]   (default: every preset)
    python scripts/param_counts.py t2i_adapter,control.adapter_type=light \
        lora_copy,control.lora_rank=64

The tiny world's counts come from its shipped base (assets/tinyworld); SD 1.5's from a UNet with
the published SD 1.5 config (cnexp/bench/sd_shapes.py) built on the meta device: shapes only, no
weights, no download, a few seconds on a CPU. What is counted is what the optimizer gets: the
branch's trainable parameters, plus the UNet decoder where the preset unlocks it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnexp.base import load_base  # noqa: E402
from cnexp.bench.sd_shapes import scaled_configs  # noqa: E402
from cnexp.config import register_configs  # noqa: E402
from cnexp.control import build_controlnet, count_trainable, decoder_parameters  # noqa: E402
from cnexp.errors import ConfigError  # noqa: E402


def preset_cfg(preset: str, base: str):
    name, *extra = preset.split(",")
    overrides = [f"+ablation={name}", f"base={base}", "data.root=unused", *extra]
    return compose(config_name="train", overrides=overrides)


def trainable(unet: UNet2DConditionModel, cfg) -> int:
    with torch.device(unet.device):  # SD: the branch is built on the meta device too
        control = build_controlnet(unet, cfg.control)
    decoder = 0 if cfg.control.sd_locked else sum(p.numel() for p in decoder_parameters(unet))
    return count_trainable(control) + decoder


def sd15_unet() -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**scaled_configs("15")["unet"]).requires_grad_(False)


def main(presets: list[str]) -> None:
    register_configs()
    presets = presets or sorted(p.stem for p in (ROOT / "conf" / "ablation").glob("*.yaml"))
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        tiny = load_base(preset_cfg("baseline", "tiny").base).unet
        sd = sd15_unet()
        print(f"{'preset':<40}{'tiny world':>14}{'SD 1.5':>16}")
        for preset in presets:
            counts = []
            for base, unet in (("tiny", tiny), ("sd15", sd)):
                own = unet
                if not preset_cfg(preset, base).control.sd_locked:  # leaves the shared base frozen
                    with torch.device(unet.device):
                        own = UNet2DConditionModel.from_config(unet.config).requires_grad_(False)
                try:
                    counts.append(trainable(own, preset_cfg(preset, base)))
                except ConfigError:  # e.g. the light adapter has no tiny-world layout
                    counts.append(None)
            tiny_count = "n/a" if counts[0] is None else f"{counts[0]:,}"
            print(f"{preset:<40}{tiny_count:>14}{counts[1] / 1e6:>15.1f}M")


if __name__ == "__main__":
    main(sys.argv[1:])

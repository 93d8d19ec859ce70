"""The branch interface (cnexp/control/branch.py): a new branch is one class that registers
itself; training, connector init, base damage, evaluation and export need no other edit.

The toy branch below is what a new module in cnexp/control/ would hold: one conv reads the noisy
latent and the condition (pooled to the latent's size); its output, average-pooled to each UNet
skip connection's resolution, reaches the UNet through one 1x1 connector per residual. No copy
of the encoder, no timestep, no text.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from omegaconf import OmegaConf
from torch import nn

from cnexp.control import BRANCHES, branch_of, build_controlnet, get_branch
from cnexp.control.branch import register
from cnexp.control.lite import residual_layout
from cnexp.control.residual import ResidualBranch
from cnexp.train import train
from conftest import compose_cfg


class PooledControl(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_channels: int = 4, residual_channels: tuple[int, ...] = (32,),
                 residual_strides: tuple[int, ...] = (1,), mid_channels: int = 64,
                 global_pool_conditions: bool = False):  # read by diffusers' pipeline
        super().__init__()
        width = residual_channels[0]
        self.latent_in = nn.Conv2d(in_channels + 3, width, kernel_size=3, padding=1)
        self.controlnet_down_blocks = nn.ModuleList(
            nn.Conv2d(width, c, kernel_size=1) for c in residual_channels)
        self.controlnet_mid_block = nn.Conv2d(width, mid_channels, kernel_size=1)

    def forward(self, sample, timestep=None, encoder_hidden_states=None, controlnet_cond=None,
                conditioning_scale=1.0, guess_mode=False, return_dict=True, **unused):
        condition = F.adaptive_avg_pool2d(controlnet_cond, sample.shape[-2:])  # (B, 3, h, w)
        h = self.latent_in(torch.cat([sample, condition], dim=1))  # (B, C0, h, w)
        down, scale = [], 1
        for conv, stride in zip(self.controlnet_down_blocks, self.config.residual_strides):
            scale *= stride
            down.append(conv(F.avg_pool2d(h, scale)) * conditioning_scale)
        mid = self.controlnet_mid_block(F.avg_pool2d(h, scale)) * conditioning_scale
        return down, mid  # the pipeline and the training loop ask for return_dict=False


class PooledBranch(ResidualBranch):
    name = "pooled"
    model_class = PooledControl

    def build(self, unet, cfg) -> PooledControl:
        channels, strides = residual_layout(unet)
        return PooledControl(unet.config.in_channels, tuple(channels), tuple(strides),
                             unet.config.block_out_channels[-1])

    def hint_conv(self, control: PooledControl) -> nn.Conv2d:
        return control.latent_in  # it has no condition embedding: the conv that reads it


@pytest.fixture
def pooled():
    register(PooledBranch)
    yield BRANCHES["pooled"]
    BRANCHES.unregister("pooled")  # the other tests see the built-in branches only


def test_a_registered_branch_builds_and_is_found_by_its_class(pooled, tiny_cfg, tiny_base):
    cfg = OmegaConf.merge(OmegaConf.to_container(tiny_cfg.control), {"branch": "pooled"})
    control = build_controlnet(tiny_base.unet, cfg)
    assert get_branch("pooled") is pooled and branch_of(control) is pooled
    assert len(pooled.connectors(control)) == len(residual_layout(tiny_base.unet)[0]) + 1
    assert all(torch.count_nonzero(c.weight) == 0 for c in pooled.connectors(control))


def test_a_registered_branch_trains_evaluates_and_exports(pooled, tmp_path):
    composed = compose_cfg([f"data.root={tmp_path / 'data'}", "data.train_size=16",
                            "data.val_size=4", "data.test_size=4", "data.batch_size=4",
                            "data.eval_size=2", "trainer.max_steps=2", "sampling.steps=2",
                            "eval.prompt_settings=[perfect]", "eval.fid=false",
                            "eval.clip_score=false", "eval.curve_images=2",
                            "logger.mode=disabled", "logger.csv=false",
                            "trainer.enable_progress_bar=false"], out_dir=tmp_path / "run")
    # the schema's Branch enum lists the built-in branches; a new one adds its name there (and
    # a preset); here an untyped copy of the composed config selects the toy
    cfg = OmegaConf.create(OmegaConf.to_container(composed, resolve=True))
    cfg.control.branch = "pooled"
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["controlnet_class"] == "PooledControl"
    assert summary["base_damage_step0"] == 0.0  # zero connectors: step 0 is the base
    assert "eval/perfect/shape_iou" in summary["final"]  # sampled through diffusers
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2
    exported = pooled.load(tmp_path / "run" / "controlnet")
    assert isinstance(exported, PooledControl)
    assert any(torch.count_nonzero(c.weight) > 0 for c in pooled.connectors(exported))  # trained

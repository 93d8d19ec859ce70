"""Typed configuration: the schema every YAML in conf/ is merged into.

Registered in Hydra's ConfigStore as `train_schema`, which `conf/train.yaml` lists first, so a
mistyped knob (`control.lr=...`) or a wrong type (`trainer.max_steps=abc`) fails at composition
with Hydra's message instead of being silently ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class BaseConfig:
    """The frozen text-to-image base: a diffusers bundle on the hub or on disk."""
    name: str = MISSING
    pretrained: str = MISSING  # hub id ("runwayml/stable-diffusion-v1-5") or a local directory
    revision: Optional[str] = None
    variant: Optional[str] = None  # e.g. "fp16" weights on the hub
    clip_model: Optional[str] = None  # CLIP-score model (hub id or directory)
    resolution: int = 512


@dataclass
class ControlConfig:
    """The trainable control network (diffusers' ControlNetModel.from_unet)."""
    conditioning_embedding_out_channels: list[int] = field(default_factory=lambda: [16, 32, 96, 256])
    conditioning_channels: int = 3


@dataclass
class OptimConfig:
    lr: float = 1e-5  # the paper's AdamW learning rate
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    prompt_dropout: float = 0.5  # share of captions replaced by "" (paper: 50%)


@dataclass
class DataConfig:
    root: str = MISSING  # fill50k layout: prompt.json + images, or train/ val/ test/ sub-roots
    generate_tinyworld: bool = False  # write the synthetic splits into root if absent
    train_size: int = 4000
    val_size: int = 256
    test_size: int = 256
    resolution: int = 64
    batch_size: int = 16
    num_workers: int = 0
    eval_size: int = 32  # fixed evaluation set: the first N validation triples


@dataclass
class SamplingConfig:
    scheduler: str = "ddim"  # ddim | unipc
    steps: int = 20
    guidance_scale: float = 7.5
    conditioning_scale: float = 1.0
    seed: int = 0  # image i of the evaluation set always starts from noise seeded seed + i


@dataclass
class EvalConfig:
    every_n_steps: int = 0  # 0: only at step 0 and at the end
    batch_size: int = 32
    grid_rows: int = 8


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = 1.0
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: Any = 1
    log_every_n_steps: int = 10
    fast_dev_run: bool = False
    enable_progress_bar: bool = True


@dataclass
class LoggerConfig:
    project: str = "cnexp"
    mode: Optional[str] = None  # online | offline | disabled; None: $WANDB_MODE, else offline
    group: Optional[str] = None
    name: Optional[str] = None
    csv: bool = True


@dataclass
class PathsConfig:
    root: str = MISSING
    assets: str = MISSING
    cache: str = MISSING
    output_dir: str = MISSING


@dataclass
class TrainConfig:
    base: BaseConfig = field(default_factory=BaseConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    ablation: str = "baseline"
    seed: int = 0
    export: bool = True  # save the trained ControlNet with save_pretrained


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)

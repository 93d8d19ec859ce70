"""Typed configuration: the schema every YAML in conf/ is merged into.

Registered in Hydra's ConfigStore as `train_schema`, which `conf/train.yaml` lists first, so a
mistyped knob (`control.lr=...`) or a wrong type (`trainer.max_steps=abc`) fails at composition
with Hydra's message instead of being silently ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


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
    """The trainable control network and how it joins the frozen UNet (cnexp/control/)."""
    conditioning_embedding_out_channels: list[int] = field(default_factory=lambda: [16, 32, 96, 256])
    conditioning_channels: int = 3
    branch: str = "copy"  # copy (paper) | lite | scratch | xs (ControlNet-XS)
    connector_init: str = "zero"  # zero (paper) | gaussian | kaiming | xavier | default (PyTorch)
    gaussian_std: float = 0.02  # weight std of connector_init=gaussian (biases start at 0)
    init_scope: str = "connectors"  # connectors | connectors_and_hint (+ hint embedding's conv_out)
    xs_size_ratio: float = 0.25  # ControlNet-XS channels = ratio x the base's block channels
    sd_locked: bool = True  # false: also train the UNet decoder at optim.decoder_lr (authors' repo)
    only_mid_control: bool = False  # true: only the middle-block residual reaches the UNet


@dataclass
class OptimConfig:
    lr: float = 1e-5  # the paper's AdamW learning rate
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    prompt_dropout: float = 0.5  # share of captions replaced by "" (paper: 50%)
    condition_dropout: float = 0.0  # share of conditions replaced by zeros (Uni-ControlNet style)
    decoder_lr: float = 2e-6  # UNet decoder's learning rate when control.sd_locked=false
    fused: bool = True  # torch's fused AdamW kernel (one kernel per step instead of a loop)
    eight_bit: bool = False  # bitsandbytes' AdamW8bit (GPU memory option for big bases)


@dataclass
class DataConfig:
    """Triples of condition/image/caption from one of three layouts (cnexp/data/)."""
    layout: str = "fill50k"  # fill50k | hf (datasets: disk, parquet, imagefolder, hub) | captions
    # fill50k: prompt.json + images, or train/ val/ test/ sub-roots; hf: directory, parquet file or
    # hub id; captions: a folder of images with .txt sidecars or metadata.jsonl/csv
    root: str = MISSING
    generate_tinyworld: bool = False  # write the synthetic splits into root if absent
    train_size: int = 4000
    val_size: int = 256
    test_size: int = 256
    resolution: int = 64
    crop: str = "center"  # center | random (random: training split only, seeded)
    batch_size: int = 16
    num_workers: int = 0
    eval_size: int = 32  # fixed evaluation set: the first N validation triples
    # hf layout columns (diffusers' names); caption_column is also the captions layout's key
    image_column: str = "image"
    conditioning_image_column: str = "conditioning_image"
    caption_column: str = "text"
    hf_config: Optional[str] = None  # configuration name of a hub dataset
    # compute conditions from the images (required for layout=captions): canny, hed, ...
    annotator: Optional[str] = None
    annotator_params: dict[str, Any] = field(default_factory=dict)  # e.g. {low_threshold: 100}
    annotator_path: Optional[str] = None  # local dir (or hub id) of hub-weight annotators
    cache_dir: Optional[str] = None  # computed conditions + datasets' cache; None: not on disk
    precompute_conditions: bool = True  # annotate every sample at setup (logs cache hits)
    skip_bad_samples: bool = False  # leave out unreadable images (scans all at setup)
    split_seed: int = 0  # cuts val/test from train when the source has none; not the run seed,
    val_fraction: float = 0.05  # so the evaluation set is the same for every seed and ablation
    test_fraction: float = 0.05


@dataclass
class CacheConfig:
    """Reuse the frozen VAE's and text encoder's outputs across steps (encode_cache.py, filled
    once before training; docs/gpu.md). Per image at 512 px: 128 KB of latent moments (fp32)."""
    latents: bool = True  # per-image posterior moments (needs data.crop=center)
    text: bool = True  # per-caption embeddings
    store: str = "disk"  # disk: memory-mapped shards under cache.dir, reused by later runs | memory
    dir: Optional[str] = None  # where the disk store keeps its shards; None: <paths.cache>/encoders
    fill_batch: int = 64  # images per encoder call while filling (the fill's memory bound)


@dataclass
class SamplingConfig:
    scheduler: str = "ddim"  # ddim | unipc
    steps: int = 20
    guidance_scale: float = 7.5
    conditioning_scale: float = 1.0
    seed: int = 0  # image i of the evaluation set always starts from noise seeded seed + i


@dataclass
class EvalConfig:
    """Evaluation callback (cnexp/metrics/callbacks.py); conf/callbacks/default.yaml explains."""
    enabled: bool = True  # false: no sampling at all (benchmarks, smoke runs)
    # full evaluations (every prompt setting, fidelity + CLIP + FID, grids): step 0, the end,
    # and every full_every_n_steps (0: only those two)
    full_every_n_steps: int = 0
    num_images: Optional[int] = None  # per prompt setting; None: the whole evaluation set
    prompt_settings: list[str] = field(
        default_factory=lambda: ["none", "insufficient", "conflicting", "perfect"])
    insufficient_prompt: str = "a high-quality, detailed, and professional image"
    conflict_shift: int = 1  # conflicting prompt of sample i: the caption of sample i + shift
    # fidelity curve (sudden convergence): perfect prompt, first curve_images; 0: off
    every_n_steps: int = 100
    curve_images: int = 8
    fidelity: str = "auto"  # auto (from data.annotator) | outline | f1 | ssim | rmse | miou
    convergence_metric: Optional[str] = None  # None: the fidelity's headline (shape_iou, f1, ..)
    convergence_threshold: float = 0.5
    clip_score: bool = True  # with base.clip_model
    fid: bool = True
    fid_feature: str = "inception"  # inception | clip (base.clip_model) | TorchScript file
    fid_reference_size: int = 256  # real validation images in the cached reference statistics
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
    strategy: str = "auto"  # ddp for several processes (trainer=ddp_cpu, or GPUs / nodes)
    num_nodes: int = 1
    log_every_n_steps: int = 10
    fast_dev_run: bool = False
    enable_progress_bar: bool = True
    checkpoint_every_n_steps: int = 0  # 0: four times per run (and always at the end)
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss or gradient does
    compile: bool = False  # torch.compile the training forward (base + control branch)
    gradient_checkpointing: bool = False  # recompute activations in backward: memory for time
    tf32: bool = True  # TF32 matmuls on Ampere+ GPUs (no effect on CPU)
    # dtype the frozen UNet, VAE and text encoder are stored in: auto (half per precision on a
    # GPU: bf16-mixed -> bf16, 16-mixed -> fp16; fp32 otherwise) | fp32 | bf16 | fp16. What
    # trains (ControlNet, an unlocked UNet decoder) keeps fp32 master weights.
    frozen_dtype: str = "auto"


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
    cache: CacheConfig = field(default_factory=CacheConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    ablation: str = "baseline"
    seed: int = 0
    export: bool = True
    ckpt_path: Optional[str] = None  # "last" (this run dir's checkpoints/last.ckpt) or a path  # save the trained ControlNet with save_pretrained


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    # the shipped assets live beside the package, whatever directory run.py is started from
    OmegaConf.register_new_resolver("cnexp_root", lambda: str(PROJECT_ROOT), replace=True)

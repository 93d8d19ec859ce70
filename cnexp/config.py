"""Typed configuration: the schema every YAML in conf/ is merged into.

Registered in Hydra's ConfigStore as `train_schema`, which `conf/train.yaml` lists first, so a
mistyped knob (`control.lr=...`) or a wrong type (`trainer.max_steps=abc`) fails at composition
with Hydra's message instead of being silently ignored.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from cnexp.data.workers import WHY as WORKERS_WHY
from cnexp.data.workers import valid_setting as valid_workers
from cnexp.knobs import (DEVICES, LEARNING_RATE, NON_NEGATIVE, POSITIVE, PROBABILITY, SEED,
                         AdapterType, Branch, CacheStore, ConditionStyle, Connector, ConnectorInit,
                         Crop, Duplicates, Family, Fidelity, FrozenDtype, InitScope, Layout,
                         LoggerMode, MetricName, OnNonFinite, PromptSetting, Scheduler, in_range)


@dataclass
class BaseConfig:
    """The frozen text-to-image base: a diffusers bundle on the hub or on disk."""
    name: str = MISSING
    pretrained: str = MISSING  # hub id ("runwayml/stable-diffusion-v1-5") or a local directory
    family: Family = Family.sd  # how it loads, trains and samples (cnexp/families/)
    revision: Optional[str] = None
    variant: Optional[str] = None  # e.g. "fp16" weights on the hub
    clip_model: Optional[str] = None  # CLIP-score model (hub id or directory)
    # true: base.pretrained is built on first use as a random bundle of the family's tiny shape
    # (base=tiny_sdxl|tiny_sd3|tiny_flux: offline tests of every family)
    random_bundle: bool = False
    # its native size: data.resolution's default (conf/base/*.yaml)
    resolution: int = field(default=512, metadata=POSITIVE)


@dataclass
class ControlConfig:
    """The trainable control network and how it joins the frozen UNet (cnexp/control/)."""
    conditioning_embedding_out_channels: list[int] = field(default_factory=lambda: [16, 32, 96, 256])
    conditioning_channels: int = field(default=3, metadata=POSITIVE)
    branch: Branch = Branch.copy  # the trainable network; choices: cnexp/knobs.py
    connector_init: ConnectorInit = ConnectorInit.zero  # paper: zero convolutions
    # weight std of connector_init=gaussian (biases start at 0)
    gaussian_std: float = field(default=0.02, metadata=POSITIVE)
    init_scope: InitScope = InitScope.connectors  # or also the hint embedding's conv_out
    # ControlNet-XS channels = ratio x the base's block channels
    xs_size_ratio: float = field(default=0.25, metadata=in_range(lambda v: 0 < v <= 1,
                                                                 "use a value in (0, 1]"))
    sd_locked: bool = True  # false: also train the UNet decoder at optim.decoder_lr (authors' repo)
    only_mid_control: bool = False  # true: only the middle-block residual reaches the UNet
    # cross_norm: the connectors' output normalised with the frozen UNet's statistics (ControlNeXt)
    connector: Connector = Connector.conv
    cross_norm_scale: float = 1.0  # cross_norm's learned scale starts here (0: step 0 is the base)
    lora_rank: int = field(default=8, metadata=POSITIVE)  # lora_copy: the adapters' rank
    adapter_type: AdapterType = AdapterType.full  # t2i_adapter: diffusers' full or light adapter


@dataclass
class OptimConfig:
    lr: float = field(default=1e-5, metadata=LEARNING_RATE)  # the paper's AdamW learning rate
    # multiplies every group's learning rate: presets say "10x lower" (low_lr: 0.1), not a rate,
    # so they mean the same on every base (cnexp.module.learning_rates)
    lr_factor: float = field(default=1.0, metadata=POSITIVE)
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # share of captions replaced by "" (paper: 50%)
    prompt_dropout: float = field(default=0.5, metadata=PROBABILITY)
    # share of conditions replaced by zeros (Uni-ControlNet style)
    condition_dropout: float = field(default=0.0, metadata=PROBABILITY)
    # UNet decoder's learning rate when control.sd_locked=false; None: 0.2 x lr (the authors'
    # 2e-6 at SD's 1e-5), so it follows the base's rate
    decoder_lr: Optional[float] = field(default=None, metadata=LEARNING_RATE)
    fused: bool = True  # torch's fused AdamW kernel (one kernel per step instead of a loop)
    eight_bit: bool = False  # bitsandbytes' AdamW8bit (GPU memory option for big bases)


WORKERS = in_range(valid_workers, WORKERS_WHY)  # data.num_workers, cache.fill_workers


@dataclass
class DataConfig:
    """Triples of condition/image/caption from one of three layouts (cnexp/data/)."""
    layout: Layout = Layout.fill50k  # hf: datasets' disk, parquet, imagefolder or hub
    # fill50k: prompt.json + images, or train/ val/ test/ sub-roots; hf: directory, parquet file or
    # hub id; captions: a folder of images with .txt sidecars or metadata.jsonl/csv
    root: str = MISSING
    generate_tinyworld: bool = False  # write the synthetic splits into root if absent
    # the tiny world's conditions: outline (fixes the kind) | extent (corner marks of position
    # and size, the same for every kind: only the prompt says it) | dotted (those marks + 7 dots
    # on the outline: the kind is there for a model that recognises it); tinyworld/styles.py
    condition_style: ConditionStyle = ConditionStyle.outline
    # the tiny world's split sizes (data.generate_tinyworld); training needs a validation sample
    train_size: int = field(default=4000, metadata=POSITIVE)
    val_size: int = field(default=256, metadata=POSITIVE)
    test_size: int = field(default=256, metadata=NON_NEGATIVE)
    resolution: int = field(default=64, metadata=in_range(
        lambda v: v > 0 and v % 8 == 0, lambda v: "use a positive multiple of 8 (the VAE's "
        f"downsampling), e.g. {max(8, v // 8 * 8)}"))
    crop: Crop = Crop.center
    batch_size: int = field(default=16, metadata=POSITIVE)
    # data-loader processes; auto: on a GPU from the job's CPUs (SLURM_CPUS_PER_TASK or the CPU
    # affinity), with pinned memory and persistent workers; on a CPU 0 (cnexp/data/workers.py)
    num_workers: str = field(default="auto", metadata=WORKERS)
    # fixed evaluation set: the first N validation triples (a smaller split: all of them, said
    # and recorded; cnexp/validate.py fit_to_splits, as for batch_size)
    eval_size: int = field(default=32, metadata=POSITIVE)
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
    # leave out unreadable images and those min_image_size / max_aspect_ratio refuse
    skip_bad_samples: bool = False
    # samples with identical decoded condition and target: keep | drop (docs/data.md)
    duplicates: Duplicates = Duplicates.keep
    # near-duplicates (a re-saved or resized copy): both 256-bit pHashes within this many bits
    # (cnexp/data/near_duplicates.py; 20: measured, docs/data.md); null: exact copies only
    near_duplicate_distance: Optional[int] = field(default=20, metadata=NON_NEGATIVE)
    # a target's shorter side below it is refused (upscaled 4x+ it trains on blur); None:
    # data.resolution // 4
    min_image_size: Optional[int] = field(default=None, metadata=NON_NEGATIVE)
    # longer / shorter side above it is refused (a center crop keeps a sliver); None: off
    max_aspect_ratio: Optional[float] = field(default=4.0, metadata=in_range(
        lambda v: v >= 1, "use a ratio >= 1 (longer side / shorter side), or null for no limit"))
    split_seed: int = field(default=0, metadata=SEED)  # cuts val/test from train when the source has none; not the run seed,
    val_fraction: float = 0.05  # so the evaluation set is the same for every seed and ablation
    test_fraction: float = 0.05


@dataclass
class CacheConfig:
    """Reuse the frozen VAE's and text encoder's outputs across steps (encode_cache.py, filled
    once before training; docs/gpu.md). Per image at 512 px: 128 KB of latent moments (fp32)."""
    latents: bool = True  # per-image posterior moments (needs data.crop=center)
    text: bool = True  # per-caption embeddings
    # SD3, Flux: the conditions' latents too (their ControlNets read them; needs data.crop=center);
    # the UNet families' control reads pixels: nothing to cache
    conditions: bool = True
    store: CacheStore = CacheStore.disk
    dir: Optional[str] = None  # where the disk store keeps its shards; None: <paths.cache>/encoders
    # images per encoder call while filling (the fill's memory bound); not in the cache's key
    fill_batch: int = field(default=64, metadata=POSITIVE)
    fill_workers: str = field(default="auto", metadata=WORKERS)  # auto: as data.num_workers


@dataclass
class SamplingConfig:
    scheduler: Scheduler = Scheduler.ddim
    steps: int = field(default=20, metadata=POSITIVE)
    guidance_scale: float = 7.5
    conditioning_scale: float = 1.0
    seed: int = field(default=0, metadata=SEED)  # image i of the evaluation set always starts from noise seeded seed + i


@dataclass
class EvalConfig:
    """Evaluation callback: cnexp/metrics/callbacks.py's docstring explains."""
    enabled: bool = True  # false: no sampling at all (benchmarks, smoke runs)
    # full evaluations (every prompt setting, fidelity + CLIP + FID, grids): step 0, the end,
    # and every full_every_n_steps (0: only those two)
    full_every_n_steps: int = field(default=0, metadata=NON_NEGATIVE)
    # false: step 0 gets only the curve (and copy drift); a sweep whose runs all start from the
    # same base needs its full step-0 evaluation once, not in every run
    full_at_start: bool = True
    # per prompt setting; None: the whole evaluation set
    num_images: Optional[int] = field(default=None, metadata=POSITIVE)
    prompt_settings: list[PromptSetting] = field(default_factory=lambda: list(PromptSetting))
    insufficient_prompt: str = "a high-quality, detailed, and professional image"  # the paper's
    conflict_shift: int = 1  # conflicting prompt of sample i: the caption of sample i + shift
    # fidelity curve (sudden convergence): perfect prompt, first curve_images; 0: off
    every_n_steps: int = field(default=100, metadata=NON_NEGATIVE)
    curve_images: int = field(default=8, metadata=NON_NEGATIVE)
    fidelity: Fidelity = Fidelity.auto  # auto: from data.annotator
    convergence_metric: Optional[str] = None  # None: the fidelity's headline (shape_iou, f1, ..)
    convergence_threshold: float = 0.5
    # the sample metrics of full evaluations (cnexp/metrics/registry.py): those listed here
    # (None: every registered one) whose own switch is on too (clip_score, fid below)
    metrics: Optional[list[MetricName]] = None
    clip_score: bool = True  # with base.clip_model
    fid: bool = True
    fid_feature: str = "inception"  # inception | clip (base.clip_model) | TorchScript file
    # real validation images in the cached reference statistics
    fid_reference_size: int = field(default=256, metadata=POSITIVE)
    batch_size: int = field(default=32, metadata=POSITIVE)
    grid_rows: int = field(default=8, metadata=POSITIVE)


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    accumulate_grad_batches: int = field(default=1, metadata=POSITIVE)
    gradient_clip_val: Optional[float] = 1.0
    # a Lightning precision (32-true, bf16-mixed, 16-mixed) or auto (trainer=auto, the default
    # run; cnexp/device.py): bf16-mixed on a GPU with bf16 units, 16-mixed on an older GPU,
    # 32-true on the CPU
    precision: str = "32-true"
    accelerator: str = "auto"  # auto: a CUDA GPU when one is visible, else the CPU; cpu | gpu
    # never guessed: several GPUs are a choice (with trainer.strategy=ddp); more CPU processes
    # than cores are said (cnexp/validate.py config_warnings)
    devices: Any = field(default=1, metadata=DEVICES)
    strategy: str = "auto"  # ddp for several processes (trainer=ddp_cpu, or GPUs / nodes)
    num_nodes: int = field(default=1, metadata=POSITIVE)
    log_every_n_steps: int = field(default=10, metadata=POSITIVE)
    fast_dev_run: bool = False
    enable_progress_bar: bool = True
    # 0: four times per run (and always at the end)
    checkpoint_every_n_steps: int = field(default=0, metadata=NON_NEGATIVE)
    on_nonfinite: OnNonFinite = OnNonFinite.stop  # what a NaN/inf loss or gradient does
    compile: bool = False  # torch.compile the training forward (base + control branch)
    gradient_checkpointing: bool = False  # recompute activations in backward: memory for time
    tf32: bool = True  # TF32 matmuls on Ampere+ GPUs (no effect on CPU)
    # dtype the frozen UNet, VAE and text encoder are stored in: auto (half per precision on a
    # GPU: bf16-mixed -> bf16, 16-mixed -> fp16; fp32 otherwise) | fp32 | bf16 | fp16. What
    # trains (ControlNet, an unlocked UNet decoder) keeps fp32 master weights.
    frozen_dtype: FrozenDtype = FrozenDtype.auto


@dataclass
class LoggerConfig:
    """W&B (offline unless WANDB_MODE or logger.mode says otherwise) and csv/metrics.csv."""
    project: str = "cnexp"
    mode: Optional[LoggerMode] = None  # None: $WANDB_MODE, else offline
    group: Optional[str] = None  # None: the sweep's name in a multirun, else the ablation
    name: Optional[str] = None  # None: <ablation>-s<seed>, + the swept knobs in a multirun
    csv: bool = True  # csv/metrics.csv, written from the run's record (cnexp/run/log.py)


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
    seed: int = field(default=0, metadata=SEED)
    export: bool = True  # save the trained branch in diffusers' format (the branch's export)
    # resume: "last" (this run dir's checkpoints/last.ckpt, which must exist), "auto" (resume if
    # it exists, else start fresh; a finished run is left alone), or a checkpoint path; the
    # checkpoint's knobs must be this run's (cnexp/run/identity.py)
    ckpt_path: Optional[str] = None
    # true: a new run that starts from ckpt_path's trained weights (another run's, other knobs
    # allowed) at step 0, with a fresh optimizer and record; metrics.json's warm_start says so
    warm_start: bool = False


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def default_cache_dir() -> str:
    """paths.cache's default: $CNEXP_CACHE, else $XDG_CACHE_HOME/cnexp, else ~/.cache/cnexp.
    One place per user shared by every run and array job, wherever a job starts (a job's
    working directory is often a home quota or a scratch that does not outlive it)."""
    if os.environ.get("CNEXP_CACHE"):
        return str(Path(os.environ["CNEXP_CACHE"]).expanduser())
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(xdg) if Path(xdg).is_absolute() else Path.home() / ".cache"  # XDG: absolute only
    return str(root / "cnexp")


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    # the shipped assets live beside the package, whatever directory run.py is started from
    OmegaConf.register_new_resolver("cnexp_root", lambda: str(PROJECT_ROOT), replace=True)
    OmegaConf.register_new_resolver("cnexp_cache", default_cache_dir, replace=True)
    import cnexp.run.naming  # noqa: F401 - registers cnexp_job_name, the multirun job's dir name

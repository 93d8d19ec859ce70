"""What one job of a plan will do and what would stop it (cnexp/launch/plan.py prints it):
device and batch, the base, CLIP and data as the run would find them, evaluations, caches."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from cnexp.errors import CnexpError
from cnexp.launch.plan_memory import access_refusal, encoder_cache, licence, plan_memory
from cnexp.launch.reach import locate, read_json

BYTES = {"torch.float32": 4, "torch.bfloat16": 2, "torch.float16": 2}


@dataclass
class Plan:
    """What one job will do (`lines`: label, text), what would stop it (`refusals`) and what
    runs otherwise than asked (`warnings`, the run's own warnings)."""
    lines: list[tuple[str, str]] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    eval_images: int = 0  # images sampled over the run (for the wall-time estimate)

    def add(self, label: str, text: str) -> None:
        self.lines.append((label, text))


# ---- what is there: base, CLIP, data -----------------------------------------------------------
def check_base(cfg: DictConfig, plan: Plan) -> Optional[str]:
    if cfg.base.random_bundle and not Path(str(cfg.base.pretrained)).is_dir():
        plan.add("base", f"{cfg.base.pretrained}: a random {cfg.base.family} bundle, built on "
                 "first use (base.random_bundle=true)")
        return None
    where, how = locate(str(cfg.base.pretrained), "model_index.json")
    plan.add("base", f"{cfg.base.pretrained}: {how}")
    if where is None:
        fix = ("point base.pretrained at a diffusers bundle directory (with model_index.json) "
               "or a hub id" if "directory" in how else "download it once where the hub answers "
               f"(huggingface-cli download {cfg.base.pretrained}, into an HF_HOME the nodes "
               "see; with HF_HUB_OFFLINE=1 runs read it from there), or point to a bundle "
               f"directory: base.pretrained=/path/to/bundle{licence(str(cfg.base.pretrained))}")
        plan.refusals.append(f"base.pretrained='{cfg.base.pretrained}' cannot be loaded ({how}): "
                             f"{fix}")
    else:  # a gated repository this token may not download
        plan.refusals += filter(None, [access_refusal(str(cfg.base.pretrained), where)])
    return where


def scored_metrics(cfg: DictConfig) -> set[str]:
    """The sample metrics the run scores (eval.metrics and each metric's own switch)."""
    from cnexp.metrics.registry import selected_metrics

    return {m.name for m in selected_metrics(cfg)} if cfg.eval.enabled else set()


def check_clip(cfg: DictConfig, plan: Plan) -> None:
    scored = scored_metrics(cfg)
    uses = "clip_score" in scored or ("fid" in scored and cfg.eval.fid_feature == "clip")
    if not uses or not cfg.base.clip_model:
        plan.add("clip", "not used" if not uses else "not set: no CLIP score")
        return
    where, how = locate(str(cfg.base.clip_model), "config.json")
    plan.add("clip", f"{cfg.base.clip_model}: {how}")
    if where is None:
        plan.refusals.append(f"base.clip_model='{cfg.base.clip_model}' cannot be loaded ({how}): "
                             f"download it once (huggingface-cli download {cfg.base.clip_model}), "
                             "point base.clip_model to a local CLIP directory, or set "
                             "eval.clip_score=false")


_OPENED: dict[str, tuple[Plan, Optional[dict]]] = {}  # the jobs of a sweep share their data


def open_data(cfg: DictConfig, plan: Plan) -> Optional[dict]:
    """{"train": n, "val": n, "captions": distinct train captions} of the data as the run
    will split it; None when it is refused."""
    key = OmegaConf.to_yaml(cfg.data, resolve=True)
    if key not in _OPENED:
        found = Plan()
        _OPENED[key] = found, _open_data(cfg, found)
    found, sizes = _OPENED[key]
    plan.lines += found.lines
    plan.refusals += found.refusals
    return sizes


def _open_data(cfg: DictConfig, plan: Plan) -> Optional[dict]:
    if OmegaConf.is_missing(cfg.data, "root"):
        plan.refusals.append(f"data.root is not set for data.layout={cfg.data.layout}: add "
                             "data.root=/path/to/data (docs/data.md)")
        return None
    root = Path(str(cfg.data.root)).expanduser()
    if cfg.data.generate_tinyworld and not (root / "train").exists():
        plan.add("data", f"{root}: generated on first use (tiny world)")
        return {"train": cfg.data.train_size, "val": cfg.data.val_size,
                "captions": cfg.data.train_size}
    from cnexp.data.datamodule import TriplesDataModule

    # batch and evaluation sizes of 1: plan_job fits the job's own to the splits (no warning
    # from this copy's setup)
    data_cfg = OmegaConf.merge(cfg.data, {"precompute_conditions": False,
                                          "skip_bad_samples": False, "batch_size": 1,
                                          "eval_size": 1})
    try:
        data = TriplesDataModule(data_cfg)
        data.setup()  # opens the layout and cuts the splits; decodes no image
    except (CnexpError, OSError) as err:
        plan.add("data", f"{cfg.data.root}: cannot be opened")
        plan.refusals.append(f"data ({cfg.data.layout} at {cfg.data.root}): {err}")
        return None
    train = data.datasets["train"]
    captions = {c for i in train.indices for c in train.source.captions(i)}
    sizes = {"train": len(train), "val": len(data.datasets["val"]), "captions": len(captions)}
    plan.add("data", f"{cfg.data.root} ({cfg.data.layout}): {sizes['train']} train, "
             f"{sizes['val']} validation samples")
    return sizes


# ---- what the run will do ------------------------------------------------------------------------
def world_size(cfg: DictConfig) -> int:
    devices = cfg.trainer.devices
    if OmegaConf.is_list(devices):
        count = len(devices)
    elif isinstance(devices, int):
        count = devices
    elif isinstance(devices, str) and devices != "auto":  # "0,1": device ids, as Lightning reads
        count = len([d for d in devices.split(",") if d.strip()])
    else:
        count = 1  # "auto": Lightning's choice, one per visible device; shown as 1
    return count * cfg.trainer.num_nodes


def describe_device(cfg: DictConfig, plan: Plan) -> bool:
    """Device, precision, frozen dtype and batches; True when the run trains on a GPU."""
    from cnexp.device import resolve_device
    from cnexp.precision import resolve_frozen_dtype

    device = resolve_device(cfg.trainer)
    frozen = resolve_frozen_dtype(cfg.trainer)
    world = world_size(cfg)
    plan.add("device", f"{device.accelerator} x {cfg.trainer.devices} "
             f"(nodes {cfg.trainer.num_nodes}, strategy {cfg.trainer.strategy})")
    plan.add("precision", f"{device.precision}, frozen base {str(frozen).removeprefix('torch.')}")
    batch, accumulate = cfg.data.batch_size, cfg.trainer.accumulate_grad_batches
    plan.add("batch", f"{batch // max(world, 1)} per device x {world} device(s) = {batch} "
             f"global" + (f", x {accumulate} accumulated = {batch * accumulate} per step"
                          if accumulate > 1 else ""))
    if batch % max(world, 1):
        plan.refusals.append(f"data.batch_size={batch} is the global batch and does not split "
                             f"over {world} devices: set data.batch_size to a multiple of {world}")
    if not device.on_gpu and cfg.data.resolution >= 512:
        plan.add("note", f"a {cfg.data.resolution} px base on the CPU: each step takes seconds "
                 "to minutes; trainer=gpu on a GPU machine")
    return device.on_gpu


def evaluations(cfg: DictConfig, n_val: Optional[int], plan: Plan) -> None:
    """Which evaluations run (cnexp/metrics/callbacks.py's schedule) and the images each samples."""
    ev, steps = cfg.eval, cfg.trainer.max_steps
    if not ev.enabled:
        plan.add("evaluation", "off (eval.enabled=false)")
        return
    n = cfg.data.eval_size  # fitted to the validation split (plan_job)
    per_setting = min(ev.num_images or n, n)
    settings = [str(s) for s in ev.prompt_settings]
    if per_setting < 2:
        settings = [s for s in settings if s != "conflicting"]
    curve = min(ev.curve_images, per_setting)
    full_every, every = int(ev.full_every_n_steps), int(ev.every_n_steps)
    full_steps = set(range(full_every, steps, full_every)) if full_every else set()
    curve_steps = [s for s in range(every, steps, every) if s not in full_steps] \
        if every and curve else []
    n_full = len(full_steps) + 1 + bool(ev.full_at_start)
    n_curve = len(curve_steps) + (0 if ev.full_at_start or not curve else 1)
    full_images = per_setting * len(settings)
    plan.eval_images = n_full * full_images + n_curve * curve
    from cnexp.families.family import get_family

    # classifier-free guidance doubles each sampling step's batch (Flux's is embedded: it does not)
    embedded = get_family(OmegaConf.select(cfg, "base.family")).guidance_embedded
    guidance = 2 if cfg.sampling.guidance_scale > 1 and not embedded else 1
    plan.add("evaluation", f"{n_full} full ({per_setting} images x {len(settings)} prompt "
             f"settings = {full_images} each), {n_curve} curve-only ({curve} images): "
             f"{plan.eval_images} images x {cfg.sampling.steps} sampling steps"
             + (" x 2 (guidance)" if guidance == 2 else ""))
    if "fid" in scored_metrics(cfg):
        reference = min(ev.fid_reference_size, n_val) if n_val is not None else \
            ev.fid_reference_size
        capped = f"; eval.fid_reference_size={ev.fid_reference_size} is more than the split " \
            "holds" if reference < ev.fid_reference_size else ""
        plan.add("fid", f"{ev.fid_feature} features, {per_setting} samples against {reference} "
                 f"real validation images (statistics cached once{capped})")


def caches(cfg: DictConfig, base_dir: Optional[str], sizes: Optional[dict], plan: Plan) -> None:
    """Where the caches go and what the encoder cache will hold (moments and embeddings are
    stored in the frozen base's dtype)."""
    from cnexp.precision import resolve_frozen_dtype

    root = Path(str(cfg.paths.cache)).expanduser()
    encoders = Path(str(cfg.cache.dir)) if cfg.cache.dir else root / "encoders"
    plan.add("caches", f"{root} (data: {cfg.data.cache_dir}; encoders: {encoders}; "
             f"FID statistics: {root / 'fid_reference'})")
    if not (cfg.cache.latents or cfg.cache.text):
        plan.add("encoder cache", "off (cache.latents=false, cache.text=false)")
        return
    if str(cfg.base.family) != "sd":  # several encoders and a pooled vector per prompt
        plan.add("encoder cache", encoder_cache(cfg, base_dir, sizes))
        return
    vae, text = read_json(base_dir, "vae/config.json"), read_json(base_dir,
                                                                  "text_encoder/config.json")
    if sizes is None or vae is None or text is None:
        plan.add("encoder cache", "size unknown until the base and the data are reachable")
        return
    width = BYTES[str(resolve_frozen_dtype(cfg.trainer))]
    side = cfg.data.resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    latents = sizes["train"] * 2 * vae["latent_channels"] * side * side * width \
        if cfg.cache.latents else 0
    tokens = text.get("max_position_embeddings", 77)
    texts = (sizes["captions"] + 1) * tokens * text["hidden_size"] * width if cfg.cache.text else 0
    where = "on disk" if cfg.cache.store == "disk" else "in memory"
    plan.add("encoder cache", f"{human(latents + texts)} {where}: latents {sizes['train']} x "
             f"2x{vae['latent_channels']}x{side}x{side}, text {sizes['captions'] + 1} captions x "
             f"{tokens}x{text['hidden_size']}, {width} bytes each")


def human(n: float) -> str:
    """Bytes in binary units: 62.5 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def plan_job(cfg: DictConfig, refusals: list[str],
             gpu: Optional[str] = None) -> tuple[Plan, bool]:
    """The plan of one job's config; also whether it trains on a GPU. `gpu`: the GPU its
    memory and time are estimated for (--gpu; default this machine's, cnexp/launch/memory.py)."""
    from cnexp.module import learning_rates
    from cnexp.validate import config_warnings, fit_to_splits, validate

    plan = Plan(refusals=list(refusals))
    try:
        validate(cfg, warn=False)  # the same checks as the run's; its warnings are printed
    except CnexpError as err:
        plan.refusals.append(str(err))
    except MissingMandatoryValue as err:  # data.root: open_data names it with its fix
        if err.full_key != "data.root":
            plan.refusals.append(f"{err.full_key} is not set: add {err.full_key}=...")
    plan.warnings += config_warnings(cfg)
    found = Plan()  # the data as the run will split it, shown after the device
    sizes = open_data(cfg, found)
    if sizes is not None:  # the batch and evaluation set the run will take from it
        plan.warnings += fit_to_splits(cfg.data, sizes)
    on_gpu = describe_device(cfg, plan)
    rates = learning_rates(cfg.optim)
    plan.add("steps", f"{cfg.trainer.max_steps} at lr {rates['control']:g}"
             + (f" (decoder {rates['decoder']:g})" if not cfg.control.sd_locked else ""))
    base_dir = check_base(cfg, plan)
    check_clip(cfg, plan)
    plan.lines += found.lines
    plan.refusals += found.refusals
    evaluations(cfg, sizes["val"] if sizes else None, plan)
    caches(cfg, base_dir, sizes, plan)
    plan_memory(cfg, plan, base_dir, gpu, on_gpu, world_size(cfg))
    return plan, on_gpu

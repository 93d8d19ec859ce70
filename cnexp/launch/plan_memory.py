"""The plan's lines for a base at scale (cnexp/launch/memory.py estimates them): the GPU, peak
memory in parts, the levers and what each saves, the time per step, the encoder cache of the
families whose prompts are more than one CLIP's states; and what the hub needs before any job
starts (a gated repository: an accepted licence and a token). A run that would not fit the GPU
is refused here, naming the levers that would make it fit.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from omegaconf import DictConfig

from cnexp.launch.geometry import Geometry, measure
from cnexp.launch.memory import (GPUS, MFU, TIGHT, Gpu, Setting, billions, estimate,
                                 evaluation_bytes, flops_per_sample, gib, levers, resolve_gpu,
                                 setting_of)
from cnexp.launch.published import BUNDLES, DENOISERS, TEXT_ENCODERS


# ---- the hub: gated repositories -------------------------------------------------------------
def licence(repo: str) -> str:
    """What a gated published repository needs ('' for others)."""
    if not BUNDLES.get(repo, {}).get("gated"):
        return ""
    return (f"; {repo} is gated: accept its licence on https://huggingface.co/{repo} and log in "
            "(HF_TOKEN=hf_... or huggingface-cli login) before downloading it")


def access_refusal(repo: str, where: Optional[str]) -> Optional[str]:
    """Online, for a hub id not in the cache: whether this machine's token may download it (a
    gated repository whose licence is not accepted fails here, not a job an hour in)."""
    if where != repo:  # a local directory or the cache: nothing to download
        return None
    from huggingface_hub import auth_check, get_token
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        auth_check(repo)
    except GatedRepoError:
        who = "no Hugging Face token is set" if get_token() is None else \
            "this token's account has not accepted its licence"
        return (f"base.pretrained={repo} is gated and {who}: accept the licence on "
                f"https://huggingface.co/{repo}, then HF_TOKEN=hf_... or huggingface-cli login")
    except RepositoryNotFoundError:
        return (f"base.pretrained={repo}: the hub has no such repository (or a private one this "
                "token cannot see): check the id, or point to a bundle directory")
    except Exception:  # noqa: BLE001 - an odd answer: the load reports it with its own words
        return None
    return None


# ---- memory and time ---------------------------------------------------------------------------
def plan_memory(cfg: DictConfig, plan, base_dir: Optional[str], gpu_name: Optional[str],
                on_gpu: bool, world: int) -> None:
    """The GPU lines of one job: printed when a GPU is named (--gpu), the job trains on one
    here, or base.pretrained is a published model cnexp knows (cnexp/launch/published.py)."""
    pretrained = str(cfg.base.pretrained)
    gpu = resolve_gpu(gpu_name)
    if not (gpu_name or on_gpu or pretrained in BUNDLES):
        return
    if str(cfg.trainer.accelerator) == "cpu" and not gpu_name:
        plan.add("memory", "not estimated: the job trains on the CPU (trainer.accelerator=cpu); "
                 "--gpu NAME plans it for a GPU")
        return
    try:
        g = measure(cfg, base_dir, cfg.data.resolution)
    except Exception as err:  # noqa: BLE001 - a plan without an estimate, saying why
        plan.add("memory", f"not estimated: the meta-device build failed: {type(err).__name__}: "
                 f"{err}")
        return
    if g is None:
        plan.add("memory", f"not estimated: no bundle configs for {pretrained}, not a published "
                 f"model cnexp knows ({', '.join(BUNDLES)}), or base.family={cfg.base.family} "
                 "has no entry in cnexp/launch/published.py BY_FAMILY")
        return
    if gpu is None:
        gpu = Gpu(*GPUS["H100"], "assumed: no GPU here, none named (--gpu NAME)")
    s, precision = setting_of(cfg, world)
    est = estimate(g, s)
    tflops = f", {gpu.tflops:g} TFLOP/s dense bf16" if gpu.tflops else ""
    plan.add("gpu", f"{gpu.label} ({gpu.how}): {gib(gpu.memory)}{tflops}")
    fits = est.total <= gpu.memory
    plan.add("memory", f"~{gib(est.total)} peak per GPU in training, "
             f"{'fits' if fits else 'does NOT fit'} ({precision}, batch {s.batch} per device "
             f"at {s.resolution} px; the model and its calibration: cnexp/launch/memory.py)")
    memory_parts(g, s, est, plan)
    rows = lever_rows(cfg, base_dir, g, s, world)
    plan.add("levers", "; ".join(f"{text} -{gib(est.total - total)}" for text, total, _ in rows)
             or "none left")
    if not fits:
        plan.refusals.append(refusal(est.total, gpu, rows, cfg, base_dir, s, world))
    elif est.total > TIGHT * gpu.memory:
        plan.warnings.append(f"the training step's ~{gib(est.total)} is within "
                             f"{1 - TIGHT:.0%} of the {gpu.label}'s {gib(gpu.memory)} (the "
                             "estimate's own error is about +-15 %): a lever gives headroom "
                             "(python -m cnexp.plan lists them)")
    if evaluation_bytes(g, s) > gpu.memory:
        plan.warnings.append(f"evaluation would hold ~{gib(evaluation_bytes(g, s))} on the "
                             f"{gpu.label}'s {gib(gpu.memory)} (its pipeline encodes prompts with "
                             "the text encoders on the GPU): optim.eight_bit=true or "
                             "trainer.frozen_dtype=bf16 shrink it, eval.enabled=false skips it")
    step_time(cfg, g, s, gpu, plan)


def memory_parts(g: Geometry, s: Setting, est, plan) -> None:
    den = next(n for n in DENOISERS if n in g.params)
    texts = sum(g.params[n] for n in TEXT_ENCODERS if n in g.params)
    where = f"off the GPU (cache.text=true): {gib(est.text or texts * s.frozen_bytes)} spared" \
        if s.cache_text else f"on the GPU, {gib(est.text)} (cache.text=false)"
    plan.add("- frozen", f"{gib(est.frozen)}: {den} {billions(g.params[den])} + VAE "
             f"{billions(g.params['vae'])} params at {s.frozen_bytes} bytes; text encoders "
             f"{billions(texts)} {where}")
    optimizer = "AdamW 8-bit moments 2" if s.eight_bit else "AdamW fp32 moments 8"
    plan.add("- trained", f"{gib(est.trained)}: {billions(g.trained)} params x (fp32 weights 4 "
             f"+ grads 4 + {optimizer}) bytes; {g.branch_note}")
    other = dataclasses.replace(s, checkpointing=not s.checkpointing)
    plan.add("- activations", f"{gib(est.activations)}: batch {s.batch}, {g.latent[0]}x"
             f"{g.latent[1]}x{g.latent[1]} latents, {g.text_row[0]} text tokens; gradient "
             f"checkpointing {'on' if s.checkpointing else 'off'} (with it "
             f"{'off' if s.checkpointing else 'on'}: {gib(estimate(g, other).activations)})")
    plan.add("- overhead", f"{gib(est.overhead)}: CUDA context, workspaces, allocator slack")
    plan.add("- evaluation", f"~{gib(evaluation_bytes(g, s))} resident while sampling (the text "
             "encoders on the GPU for the pipeline's prompts, no gradients; its activations "
             "and the metrics' models not counted)")


def lever_rows(cfg, base_dir, g, s, world) -> list[tuple[str, float, Setting]]:
    """(override, the estimate with it alone, its setting), the largest saving first."""
    rows = []
    for text, changed, _ in levers(cfg, s, world):
        geometry = g if changed.resolution == s.resolution else \
            measure(cfg, base_dir, changed.resolution)
        rows.append((text, estimate(geometry, changed).total, changed))
    return sorted(rows, key=lambda row: row[1])


def refusal(total: float, gpu: Gpu, rows, cfg, base_dir, s: Setting, world: int) -> str:
    """The levers with what each saves alone, and the memory-only ones (the run's results are
    the same: dtype, recomputation, optimizer state, caches) pulled together."""
    together = s
    for _, changed, memory_only in levers(cfg, s, world):
        if memory_only:  # each changes its own fields of the setting
            together = dataclasses.replace(together, **{
                f.name: getattr(changed, f.name) for f in dataclasses.fields(s)
                if getattr(changed, f.name) != getattr(s, f.name)})
    together = estimate(measure(cfg, base_dir, s.resolution), together).total
    levers_text = "; ".join(f"{text} (-{gib(total - new)}"
                            f"{', enough alone' if new <= gpu.memory else ''})"
                            for text, new, _ in rows)
    after = "" if together <= gpu.memory else \
        ": still too much, so a smaller data.resolution or a larger GPU (--gpu H200)"
    return (f"the training step needs ~{gib(total)} per GPU and the {gpu.label} has "
            f"{gib(gpu.memory)} (DDP does not split the model): {levers_text or 'no lever left'}"
            f"; the memory-only levers together: ~{gib(together)}{after}")


def step_time(cfg: DictConfig, g: Geometry, s: Setting, gpu: Gpu, plan) -> None:
    if not gpu.tflops:
        plan.add("step time", f"not estimated: cnexp has no peak TFLOP/s for {gpu.label} "
                 f"(--gpu one of {', '.join(GPUS)})")
        return
    peak = gpu.tflops * 1e12 * (0.5 if s.compute_bytes == 4 else 1.0)  # 32-true: TF32
    per_sample = flops_per_sample(g, s)
    mfu = MFU["unet" if "unet" in g.params else "transformer"]
    seconds = per_sample * s.batch / (peak * mfu)
    accumulate = cfg.trainer.accumulate_grad_batches
    run = seconds * accumulate * cfg.trainer.max_steps
    plan.add("step time", f"~{seconds:.2f} s per batch of {s.batch} ({per_sample / 1e12:.1f} "
             f"TFLOP per sample at {mfu:.0%} MFU{', TF32' if s.compute_bytes == 4 else ''}); "
             f"x {accumulate} accumulated: ~{seconds * accumulate:.1f} s per step, "
             f"{cfg.trainer.max_steps} steps ~{run / 3600:.1f} h before evaluation")


# ---- the encoder cache of the multi-encoder families ----------------------------------------
def encoder_cache(cfg: DictConfig, base_dir: Optional[str], sizes: Optional[dict]) -> str:
    """What the encoder cache holds for a family whose cached prompt is several encoders'
    states and a pooled vector (family.pack_text): its size, and T5's share of it."""
    try:
        g = measure(cfg, base_dir, cfg.data.resolution)
    except Exception as err:  # noqa: BLE001 - a plan without the size, saying why
        return f"size unknown: the meta-device build failed: {type(err).__name__}: {err}"
    if g is None:
        return "size unknown until the base's configs are reachable"
    width = setting_of(cfg, 1)[0].frozen_bytes if str(cfg.trainer.accelerator) != "cpu" else 4
    tokens, row_width, pooled = g.text_row
    rows = tokens + (math.ceil(pooled / row_width) if pooled else 0)
    per_caption = rows * row_width * width
    channels, side = g.latent
    conditions = bool(g.latent_control and cfg.cache.conditions)  # the condition's latents too
    per_image = 2 * channels * side * side * width * (int(cfg.cache.latents) + int(conditions))
    share = ""
    if g.t5:  # T5-XXL's states: most of a cached SD3 or Flux prompt
        t5 = g.tokens[g.t5] * g.widths[g.t5] * width
        share = f", of which T5's {g.tokens[g.t5]} tokens x {g.widths[g.t5]} = " \
            f"{t5 / 2 ** 20:.1f} MiB"
    text = f"text {rows}x{row_width} per caption ({per_caption / 2 ** 20:.2f} MiB{share})" \
        if cfg.cache.text else "text not cached"
    kinds = " and ".join(k for k, on in (("image", cfg.cache.latents), ("condition", conditions))
                         if on)
    latents = f"latents 2x{channels}x{side}x{side} per {kinds}" if kinds else \
        "latents not cached"
    where = "on disk" if cfg.cache.store == "disk" else "in memory"
    if sizes is None:
        return f"{latents}, {text}; {width} bytes each ({where}; totals once the data is there)"
    captions = sizes["captions"] + 1  # + the empty prompt
    total = sizes["train"] * per_image + (captions * per_caption if cfg.cache.text else 0)
    return (f"{gib(total)} {where}: {sizes['train']} images' {latents}, {captions} captions' "
            f"{text}; {width} bytes each")

"""A plan before the run: what `python run.py <overrides>` would do, and what would fail.

    python -m cnexp.plan [--time-steps N] [--gpu H100] [-m] [key=value ...]   # run.py's overrides

Composes the config as run.py does and, without training, prints the device, precision and
frozen dtype, the batch per device and in all, the steps, the evaluations and how many images
they sample, where the caches go and how big they grow, and whether the base, the CLIP model and
the data are there. A multirun (-m, or a preset such as +sweep=sd_paper that sets it) lists its
jobs by the names their directories will have. `--time-steps N` times N training steps on this
machine (default: 3 on a GPU, none on a CPU) and estimates each job's wall time. A published
base at scale (base=sdxl|sd35|flux) or a job on a GPU also gets an estimate of peak GPU memory in
parts, the levers that lower it and time per step, on this machine's GPU or `--gpu NAME`'s
(cnexp/launch/memory.py); one that would not fit is refused, naming the levers.

What would fail later is refused here, each with the override that fixes it (exit code 2), so a
45-job array is not the first to find a wrong path or an evaluation larger than its data.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from cnexp.config import PROJECT_ROOT, register_configs
from cnexp.errors import CnexpError
from cnexp.launch.plan_checks import Plan, plan_job, world_size


# ---- composing: the run's config, or each job of a multirun ------------------------------------
def compose_jobs(overrides: list[str], multirun: bool) -> tuple[DictConfig, list[tuple]]:
    """(the config of the command line, [(job name, job config)]), jobs as Hydra's basic
    sweeper expands them (hydra.sweeper.params, then the command line) and named as
    conf/hydra/default.yaml names their directories."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cnexp.overrides import knobs_suffix
    from cnexp.schema import check_overrides

    check_overrides(overrides)  # a key the schema lacks, named with its nearest knob, + or not
    parser = OverridesParser.create()
    overrides = [*(["hydra.mode=MULTIRUN"] if multirun else []), *overrides]
    single = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    cfg, refusals = compose(single)  # the sweep's own settings (+sweep=...), no job's values
    if str(cfg.hydra.mode) != "RunMode.MULTIRUN":
        if len(single) < len(overrides):
            raise CnexpError("the command line sweeps a knob (a,b values or glob()): plan it "
                             "as the multirun it is with -m, as python run.py -m would run it")
        return cfg, [(f"{cfg.ablation}-s{cfg.seed}", cfg, refusals)]
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()]
    parsed = parser.parse_overrides([*params, *overrides])
    swept = frozenset(o.key_or_group for o in parsed if o.is_sweep_override())
    jobs = []
    for num, job in enumerate(j for batch in BasicSweeper.split_arguments(parsed, None)
                              for j in batch):
        job_cfg, refusals = compose(job)
        jobs.append((f"{num}_{job_cfg.ablation}-s{job_cfg.seed}{knobs_suffix(job, swept)}",
                     job_cfg, refusals))
    return cfg, jobs


def compose(overrides: list[str]) -> tuple[DictConfig, list[str]]:
    """The config run.py's job would train with (under the SLURM launcher: the job's GPUs and
    nodes in trainer.*, as cnexp/run/context.py sets them), and what that step refuses."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=list(overrides),
                            return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:runtime.cwd} in paths.root
    with open_dict(cfg):  # no run directory exists yet: where it would go
        cfg.paths.output_dir = str(cfg.hydra.run.dir)
    from cnexp.run.context import apply_slurm_resources

    try:
        apply_slurm_resources(cfg)
    except CnexpError as err:
        return cfg, [str(err)]
    return cfg, []


def launcher_checks(cfg: DictConfig, plan: Plan) -> None:
    target = str(OmegaConf.select(cfg, "hydra.launcher._target_") or "")
    if "Slurm" in target:
        launcher = cfg.hydra.launcher
        partition = launcher.partition or "the cluster's default"
        plan.add("launcher", f"SLURM, partition {partition}, {launcher.gpus_per_node} GPU(s) x "
                 f"{launcher.nodes} node(s), time limit {launcher.timeout_min} min x up to "
                 f"{1 + launcher.max_num_timeout} pieces (requeued jobs resume: ckpt_path=auto)")
    elif "Joblib" in target:
        plan.add("launcher", f"local, {cfg.hydra.launcher.n_jobs} jobs at a time (joblib)")


def duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


# ---- the command ---------------------------------------------------------------------------------
def refused(plans: list[tuple[str, Plan]], common: list[str], kind: str = "refusals") -> list[str]:
    """Each reason (of `kind`: refusals or warnings) once; one that only some jobs of a multirun
    have names them."""
    jobs: dict[str, list[str]] = {}
    for name, plan in plans:
        for reason in getattr(plan, kind):
            jobs.setdefault(reason, []).append(name)
    return [*common, *(reason if len(names) == len(plans) else f"{reason} (jobs: "
                       f"{', '.join(names)})" for reason, names in jobs.items())]


def main(argv: Optional[list[str]] = None) -> int:
    from hydra.core.hydra_config import HydraConfig

    before = HydraConfig.instance().cfg  # compose sets it per job; a caller's stays its own
    try:
        return _main(argv)
    finally:
        HydraConfig.instance().cfg = before


def _main(argv: Optional[list[str]]) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnexp.plan", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--multirun", action="store_true", help="plan the sweep's jobs")
    parser.add_argument("--time-steps", type=int, default=None,
                        help="training steps to time (default: 3 on a GPU, 0 on a CPU)")
    parser.add_argument("--gpu", default=None, help="estimate memory and time for this GPU "
                        "(A100-40, A100-80, H100, H200, L40S, RTX4090; default: this machine's)")
    parser.add_argument("overrides", nargs="*", help="the overrides run.py takes")
    args = parser.parse_args(argv)
    register_configs()
    from hydra.errors import HydraException

    try:
        cfg, jobs = compose_jobs(args.overrides, args.multirun)
        plans = [(name, *plan_job(job_cfg, refusals, args.gpu))
                 for name, job_cfg, refusals in jobs]
    except (CnexpError, HydraException) as err:  # a mistyped knob, no such preset, ...
        print(f"plan refused (nothing was trained):\n  - {err}", file=sys.stderr)
        return 2
    first, on_gpu = plans[0][1], plans[0][2]
    common = Plan()
    launcher_checks(cfg, common)
    print(f"cnexp plan: python run.py {'-m ' * args.multirun}{' '.join(args.overrides)}".rstrip())
    for label, text in [*first.lines, *common.lines]:
        print(f"  {label:<14}{text}")
    if len(jobs) > 1:
        print(f"  {'jobs':<14}{len(jobs)} in {cfg.hydra.sweep.dir}/ (above: job 0; every job "
              "is checked)")
        for name, _, _ in plans:
            print(f"    {name}")
    warnings = refused([(name, plan) for name, plan, _ in plans], [], "warnings")
    if warnings:  # what the run would warn about: it runs, but not as asked
        print("plan warns (the run would say the same):", file=sys.stderr)
        for warning in warnings:
            print(f"  - {warning}", file=sys.stderr)
    reasons = refused([(name, plan) for name, plan, _ in plans], common.refusals)
    if reasons:
        print("plan refused (nothing was trained):", file=sys.stderr)
        for reason in reasons:
            print(f"  - {reason}", file=sys.stderr)
        return 2
    import torch

    here = torch.cuda.is_available() or not on_gpu  # this machine can run the job's steps
    steps = args.time_steps if args.time_steps is not None else (3 if on_gpu and here else 0)
    if steps <= 0 or not here:
        why = ("the jobs train on a GPU and this machine has none: run the plan on a GPU node "
               "(e.g. srun --gres=gpu:1 python -m cnexp.plan ...)" if not here else
               "on the CPU by default (--time-steps N times N steps)" if not on_gpu else
               "--time-steps 0")
        print(f"  {'time':<14}not measured: {why}")
        return 0
    from cnexp.launch.steptime import time_steps

    per_step, per_image_step = time_steps(jobs[0][1], steps, world_size(jobs[0][1]))
    print(f"  {'time':<14}{per_step:.3f} s per training step (job 0, timed over {steps} steps, "
          "encoders uncached), " f"{per_image_step * 1e3:.1f} ms per image per sampling step")
    longest = 0.0
    for (name, job_cfg, _), (_, plan, _) in zip(jobs, plans):
        guidance = 2 if job_cfg.sampling.guidance_scale > 1 else 1
        evaluating = plan.eval_images * job_cfg.sampling.steps * guidance * per_image_step
        total = job_cfg.trainer.max_steps * per_step + evaluating
        print(f"    {name}: ~{duration(total)} ({job_cfg.trainer.max_steps} steps, "
              f"evaluation ~{duration(evaluating)})")
        longest = max(longest, total)
    return time_limit_check(cfg, longest)


def time_limit_check(cfg: DictConfig, seconds: float) -> int:
    """Under SLURM: whether the time limit's pieces (1 + max_num_timeout requeues) cover the
    longest job, with the base reloaded in each piece (a margin of 10 %)."""
    launcher = cfg.hydra.launcher
    if "Slurm" not in str(OmegaConf.select(cfg, "hydra.launcher._target_") or ""):
        return 0
    piece = launcher.timeout_min * 60
    pieces = math.ceil(seconds * 1.1 / piece)
    print(f"  {'time limit':<14}{launcher.timeout_min} min: the longest job needs ~{pieces} "
          f"piece(s) of it; at most {1 + launcher.max_num_timeout} run")
    if pieces <= 1 + launcher.max_num_timeout:
        return 0
    print(f"plan refused (nothing was trained):\n  - the longest job (~{duration(seconds)}) does "
          f"not fit {1 + launcher.max_num_timeout} x {launcher.timeout_min} min: raise "
          "hydra.launcher.timeout_min (the partition's limit) or hydra.launcher.max_num_timeout",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

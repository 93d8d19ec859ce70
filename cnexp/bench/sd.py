"""The benchmark's SD-shaped mode (`python -m cnexp.bench --sd 15`): no weights needed.

A random SD 1.5- (or 2.1-) shaped bundle from the published configs (cnexp.bench.sd_shapes; `--width`
shrinks the channels for a CPU), fill50k-layout triples at the chosen resolution, and cnexp's
variants side by side with diffusers' train_controlnet.py (`--diffusers-src`), each a child
process timed inside itself as the tiny-world bench does (common.measure, child.py). On a GPU both train in bf16 mixed
precision with the frozen base stored in bf16; on a CPU in fp32. Reported per trainer: s/step,
images/s, ratio to the peer, peak memory (GPU: torch.cuda.max_memory_allocated via cnexp.bench.child;
CPU: peak RSS), start-up, the mean loss over the same timed steps, FLOPs/step and MFU
(cnexp.bench.flops says what is counted).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import re
import statistics
import sys
from pathlib import Path

import torch

from cnexp.bench import flops
from cnexp.bench.common import (LEVERS, LR, PEER, TOLERANCE, child_cmd, judge, measure,
                                prepare_peer_inputs, ratio, run_child, run_directory)
from cnexp.bench.sd_shapes import (SHAPES, build_bundle, parameter_counts, scaled_configs,
                                   write_triples)
from cnexp.run.record import CSV_FILE

LOG_EVERY = 10  # cnexp's loss is recorded (and read from the device) every 10 steps
N_EVAL = 8  # validation/test triples (evaluation is off; the data module wants them)
CHANNELS = (16, 32, 96, 256)  # the ControlNet's conditioning embedding (SD presets, script)
PEAK = re.compile(r"CNEXP_PEAK device='([^']*)' gpu_bytes=(\d+)")


def cnexp_sd_cmd(steps: int, out: Path, setup: dict, cache: bool, *extra: str) -> list[str]:
    return child_cmd("run.py", f"hydra.run.dir={out}",
            f"base=sd{setup['version']}", f"base.pretrained={setup['bundle']}", "data=fill50k",
            f"data.root={setup['data']}", f"data.resolution={setup['resolution']}",
            f"data.batch_size={setup['batch']}", f"data.eval_size={N_EVAL}",
            f"trainer={'gpu' if setup['gpu'] else 'cpu'}", f"trainer.max_steps={steps}",
            "trainer.checkpoint_every_n_steps=1000000", f"optim.lr={LR}",
            "optim.prompt_dropout=0.5", f"cache.latents={cache}", f"cache.text={cache}",
            f"cache.dir={setup['work'] / 'encoders'}",
            f"control.conditioning_embedding_out_channels=[{','.join(map(str, CHANNELS))}]",
            "eval.enabled=false", "export=false", "logger.mode=disabled",
            "trainer.enable_progress_bar=false", f"trainer.log_every_n_steps={LOG_EVERY}",
            *extra)


def peer_sd_cmd(script: Path, steps: int, out: Path, setup: dict) -> list[str]:
    report = "tensorboard" if importlib.util.find_spec("tensorboard") else "wandb"
    return child_cmd(script,
            f"--pretrained_model_name_or_path={setup['bundle']}",
            f"--controlnet_model_name_or_path={setup['controlnet']}", f"--output_dir={out}",
            f"--train_data_dir={setup['parquet']}", "--image_column=image",
            "--conditioning_image_column=conditioning_image", "--caption_column=text",
            f"--resolution={setup['resolution']}", f"--train_batch_size={setup['batch']}",
            f"--max_train_steps={steps}", f"--learning_rate={LR}",
            "--proportion_empty_prompts=0.5", "--seed=0", "--checkpointing_steps=1000000",
            f"--report_to={report}", f"--mixed_precision={'bf16' if setup['gpu'] else 'no'}",
            "--max_grad_norm=1.0", "--adam_weight_decay=1e-2")


def peer_losses_by_step(output: str) -> dict[int, float]:
    """Step -> loss from the script's tqdm bar: the last postfix shown at each count is that
    step's (the bar advances, then set_postfix shows the new loss)."""
    pattern = r"(\d+)/\d+ \[[^\]\r\n]*?(?<![_a-z])loss=([0-9.]+(?:e-?[0-9]+)?)"
    return {int(step): float(loss) for step, loss in re.findall(pattern, output)}


def window_loss(name: str, run_dir: Path, output: str, warmup: int, steps: int) -> float | None:
    """Mean training loss over steps warmup+1 .. warmup+steps of a run (cnexp's: the steps it
    recorded, every LOG_EVERY)."""
    by_step = peer_losses_by_step(output) if name == PEER else cnexp_losses_by_step(run_dir)
    values = [by_step[s] for s in range(warmup + 1, warmup + steps + 1) if s in by_step]
    return round(statistics.mean(values), 5) if values else None


def cnexp_losses_by_step(out: Path) -> dict[int, float]:
    """Step (steps done) -> loss from a run's csv/metrics.csv."""
    rows = csv.DictReader((out / CSV_FILE).open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def peak_memory(output: str) -> tuple[str | None, int | None]:
    found = PEAK.findall(output)
    return (found[-1][0], int(found[-1][1])) if found else (None, None)


def prepare(args, work: Path) -> dict:
    """The bundle, the triples, the peer's inputs: everything the children share."""
    version = args.sd
    resolution = args.resolution or SHAPES[version]["resolution"]
    setup = {"version": version, "resolution": resolution, "batch": args.batch,
             "width": args.width, "work": work, "gpu": torch.cuda.is_available()}
    setup["bundle"] = build_bundle(work / "bundle", version, args.width)
    setup["data"] = write_triples(work / "data", {"train": args.images, "val": N_EVAL,
                                                  "test": N_EVAL}, resolution)
    if args.diffusers_src:
        setup["parquet"], setup["controlnet"] = prepare_peer_inputs(
            work, setup["data"], setup["bundle"], CHANNELS)
    configs = scaled_configs(version, args.width)
    setup["flops"] = flops.step_flops(configs, args.batch, resolution,
                                      conditioning_channels=CHANNELS)
    setup["params_m"] = {k: round(v, 1) for k, v in parameter_counts(setup["bundle"]).items()}
    return setup


def run_sd(args, work: Path, env: dict) -> tuple[list[dict], dict]:
    setup = prepare(args, work)
    variants = {"cnexp": lambda n, tag: cnexp_sd_cmd(n, run_directory(work, tag), setup, True),
                "cnexp (no cache)": lambda n, tag: cnexp_sd_cmd(n, run_directory(work, tag),
                                                                setup, False)}
    cached = {"cnexp": True, "cnexp (no cache)": False, PEER: False}
    for lever in filter(None, args.levers.split(",")):
        if lever not in LEVERS:
            sys.exit(f"--levers: unknown lever {lever!r}; choose from {', '.join(LEVERS)}")
        name, knob = f"cnexp + {LEVERS[lever]}", LEVERS[lever]
        variants[name] = lambda n, tag, knob=knob: cnexp_sd_cmd(n, run_directory(work, tag),
                                                                setup, True, knob)
        cached[name] = True
    if args.diffusers_src:
        script = args.diffusers_src / "examples" / "controlnet" / "train_controlnet.py"
        variants[PEER] = lambda n, tag: peer_sd_cmd(script, n, run_directory(work, tag), setup)
    # one short cnexp run fills the disk cache first: timed runs all start with it filled
    first, _, _ = run_child(variants["cnexp"](1, "prime"), env)
    results = []
    for rnd in range(args.rounds):
        for name, make in variants.items():
            res = measure(name, make, args.warmup, args.steps, rnd, env)
            results.append({**res, "round": rnd})
    rows = summarize_sd(results, variants, cached, setup, args, work)
    print(f"first cnexp run (fills the encoder cache, 1 step): {first:.1f} s wall")
    setup["first_run_s"] = round(first, 1)
    return rows, setup


def summarize_sd(results: list[dict], variants: dict, cached: dict, setup: dict, args,
                 work: Path) -> list[dict]:
    parts = setup["flops"]
    rows = []
    for name in variants:
        mine = [r for r in results if r["name"] == name]
        step, invalid = judge([r["step_s"] for r in mine], getattr(args, "tolerance", TOLERANCE))
        output = "".join(mine[-1]["outputs"])
        device, gpu_bytes = peak_memory(output)
        executed = flops.executed(parts, cached[name], cached[name])
        utilisation = flops.mfu(executed, step, device, "bf16" if setup["gpu"] else "32") \
            if step else None
        rows.append({
            "trainer": name, "step_s": round(step, 4) if step else None, "invalid": invalid,
            "images_s": round(setup["batch"] / step, 2) if step else None,
            "peak_gpu_gib": round(gpu_bytes / 2**30, 2) if gpu_bytes else None,
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in mine)),
            "startup_s": round(statistics.median(r["fixed_s"] for r in mine), 1),
            "tflop_step": round(executed / 1e12, 4),
            "mfu": round(utilisation, 4) if utilisation is not None else None,
            "loss": window_loss(name, run_directory(work, f"{name}-l{args.rounds - 1}"), output,
                                args.warmup, args.steps),
            "device": device or "cpu", "rounds_step_s": [round(r["step_s"], 4) for r in mine]})
    ref = next((r for r in rows if r["trainer"] == PEER), rows[0])
    for r in rows:
        r["ratio"] = ratio(ref["step_s"], r["step_s"])
    print_table(rows, ref, setup, args)
    return rows


def print_table(rows: list[dict], ref: dict, setup: dict, args) -> None:
    parts, p = setup["flops"], setup["params_m"]
    print(f"\nSD {setup['version']}-shaped random bundle (width {setup['width']}: UNet "
          f"{p['unet']}M, VAE {p['vae']}M, text {p['text_encoder']}M), {setup['resolution']} px, "
          f"batch {setup['batch']}, {'bf16 mixed' if setup['gpu'] else 'fp32'}, {args.steps} "
          f"timed steps x {args.rounds} rounds, device {rows[0]['device']}")
    print("FLOPs/step (FlopCounterMode; one training step: ControlNet fwd+bwd, frozen UNet fwd + "
          "input-grad bwd, VAE encode and text encoder fwd where not cached): "
          + ", ".join(f"{k} {v / 1e12:.3f} T" for k, v in parts.items()))
    memory = "peak GPU GiB" if setup["gpu"] else "peak RSS MiB"
    print(f"{'trainer':34} {'step (s)':>9} {'images/s':>9} {'ratio':>7} "
          f"{memory:>13} {'start-up s':>10} {'TFLOP/step':>10} {'MFU':>6} {'loss':>8}")
    for r in rows:
        mem = r["peak_gpu_gib"] if setup["gpu"] else r["peak_rss_mib"]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "n/a"
        rounds = "rounds: " + ", ".join(f"{x:.4f}" for x in r["rounds_step_s"])
        if r["invalid"]:
            step, images, ratio_ = "invalid", "", ""
        else:
            step, images = f"{r['step_s']:.4f}", f"{r['images_s']:.2f}"
            ratio_ = f"{r['ratio']:.2f}x" if r["ratio"] else "n/a"
        print(f"{r['trainer']:34} {step:>9} {images:>9} {ratio_:>7} {mem!s:>13} "
              f"{r['startup_s']:10.1f} {r['tflop_step']:10.3f} {mfu:>6} {loss:>8}   {rounds}"
              + (f"  ({r['invalid']})" if r["invalid"] else ""))
    print(f"ratio: {ref['trainer']}'s step time over each trainer's (> 1: faster); "
          f"loss: mean over the timed steps {args.warmup + 1}..{args.warmup + args.steps} of the "
          "last round; MFU: executed FLOPs / step time / the chip's dense bf16 peak "
          "(n/a on a CPU, an unknown chip or fp32); step time measured inside each process, "
          f"valid when every round is positive and the rounds agree within "
          f"{getattr(args, 'tolerance', TOLERANCE):.0%}")


def write_json(path: Path, rows: list[dict], setup: dict) -> None:
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in setup.items()}
    path.write_text(json.dumps({"setup": meta, "rows": rows}, indent=1))


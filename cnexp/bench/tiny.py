"""The benchmark's tiny-world mode: cnexp side by side with diffusers'
examples/controlnet/train_controlnet.py (`python -m cnexp.bench`, cli.py).

Both trainers get the same tiny-world base, the same 256 training triples (64 px), batch size,
fp32, AdamW (lr 1e-3), and the same ControlNet architecture. Each round runs every trainer once,
as a child process, for `warmup + steps` optimizer steps; the step time is measured inside the
child over the last `steps` steps (common.py, child.py). Peak RSS is the child's max resident set.
Without --diffusers-src only cnexp's own variants are measured (with and without the
frozen-encoder cache). The cache is on disk (cache.dir in the work directory): one short cnexp
run fills it before the timed runs.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import sys
from pathlib import Path

from cnexp.bench.common import (LEVERS, LR, PEER, ROOT, TOLERANCE, child_cmd, cnexp_losses, judge,
                                measure, prepare_peer_inputs, ratio, run_child, run_directory)
from cnexp.run.record import METRICS_FILE

BATCH, N_TRAIN = 16, 256
__all__ = ["LEVERS", "cnexp_cmd", "peer_cmd", "peer_losses", "run_tiny", "summarize"]


def cnexp_cmd(steps: int, out: Path, data: Path, cache: bool, *extra: str) -> list[str]:
    return child_cmd("run.py", f"hydra.run.dir={out}", f"trainer.max_steps={steps}",
                     f"data.root={data}", f"data.train_size={N_TRAIN}", "data.val_size=8",
                     "data.test_size=8", f"data.batch_size={BATCH}", f"optim.lr={LR}",
                     "optim.prompt_dropout=0.5", f"cache.latents={cache}", f"cache.text={cache}",
                     f"cache.dir={data.parent / 'encoders'}", "eval.enabled=false", "export=false",
                     "logger.mode=disabled", "trainer.enable_progress_bar=false",
                     "trainer.checkpoint_every_n_steps=1000000", *extra)  # as the script: none


def peer_cmd(script: Path, steps: int, out: Path, parquet_dir: Path, controlnet: Path) -> list[str]:
    return child_cmd(script, f"--pretrained_model_name_or_path={ROOT / 'assets/tinyworld'}",
                     f"--controlnet_model_name_or_path={controlnet}", f"--output_dir={out}",
                     f"--train_data_dir={parquet_dir}", "--image_column=image",
                     "--conditioning_image_column=conditioning_image", "--caption_column=text",
                     "--resolution=64", f"--train_batch_size={BATCH}", f"--max_train_steps={steps}",
                     f"--learning_rate={LR}", "--proportion_empty_prompts=0.5", "--seed=0",
                     "--checkpointing_steps=100000", "--report_to=wandb", "--mixed_precision=no",
                     "--max_grad_norm=1.0", "--adam_weight_decay=1e-2")


def peer_losses(output: str) -> list[float]:
    """The script's tqdm postfix (`loss=0.0561, lr=...`): most steps, as the bar refreshes."""
    return [float(x) for x in re.findall(r"(?<![_a-z])loss=([0-9.]+(?:e-?[0-9]+)?)", output)]


def run_tiny(args, work: Path, env: dict) -> list[dict]:
    from cnexp.tinyworld.shapes import ensure_tiny_dataset

    data = ensure_tiny_dataset(work / "data", {"train": N_TRAIN, "val": 8, "test": 8})

    def run_dir(tag):
        return run_directory(work, tag)

    variants = {
        "cnexp": lambda n, tag: cnexp_cmd(n, run_dir(tag), data, cache=True),
        "cnexp (no cache)": lambda n, tag: cnexp_cmd(n, run_dir(tag), data, cache=False),
    }
    for lever in filter(None, args.levers.split(",")):  # each alone, on top of the default
        name, knob = f"cnexp + {LEVERS[lever]}", LEVERS[lever]
        variants[name] = lambda n, tag, knob=knob: cnexp_cmd(n, run_dir(tag), data, True, knob)
    if args.diffusers_src:
        script = args.diffusers_src / "examples" / "controlnet" / "train_controlnet.py"
        parquet_dir, controlnet = prepare_peer_inputs(work, data)
        variants[PEER] = lambda n, tag: peer_cmd(script, n, run_dir(tag), parquet_dir, controlnet)

    run_child(variants["cnexp"](1, "prime"), env)  # fills the disk cache the timed runs share
    results = []
    for rnd in range(args.rounds):  # alternate the trainers so drifts hit all of them alike
        for name, make in variants.items():
            res = measure(name, make, args.warmup, args.steps, rnd, env)
            results.append({**res, "round": rnd})
    table = summarize(results, variants, work, args)
    if args.default_run:
        table.append(default_run(work / "runs" / "default", env))
    return table


def default_run(out: Path, env: dict) -> dict:
    """The default experiment, unchanged: how much of its wall time evaluation takes."""
    wall, peak, _ = run_child([sys.executable, "run.py", f"hydra.run.dir={out}",
                          "trainer.enable_progress_bar=false"], env)
    summary = json.loads((out / METRICS_FILE).read_text())
    row = {"trainer": "default run (python run.py)", "wall_s": round(wall, 1),
           "eval_s": summary["eval_seconds"], "eval_share": summary["eval_share"],
           "peak_rss_mib": round(peak)}
    print(f"default run: {row['wall_s']} s wall, evaluation {row['eval_s']} s = "
          f"{100 * row['eval_share']:.0f}% of training+evaluation, peak RSS {row['peak_rss_mib']} MiB")
    return row


def summarize(results: list[dict], variants: dict, work: Path, args) -> list[dict]:
    tolerance = getattr(args, "tolerance", None) or TOLERANCE
    rows = []
    for name in variants:
        mine = [r for r in results if r["name"] == name]
        step, invalid = judge([r["step_s"] for r in mine], tolerance)
        rows.append({"trainer": name, "step_s": round(step, 4) if step else None,
                     "invalid": invalid, "images_s": round(BATCH / step, 1) if step else None,
                     "peak_rss_mib": round(max(r["peak_rss_mib"] for r in mine)),
                     "fixed_s": round(statistics.median(r["fixed_s"] for r in mine), 1),
                     "rounds_step_s": [round(r["step_s"], 4) for r in mine]})
    ref = next((r for r in rows if r["trainer"] == PEER), rows[min(1, len(rows) - 1)])
    print(f"\nsteady-state training, tiny world 64 px, batch {BATCH}, fp32, {args.steps} timed "
          f"steps (after {args.warmup}) x {args.rounds} rounds, measured inside each process; "
          f"a figure is valid when every round is positive and the rounds agree within "
          f"{tolerance:.0%}; torch threads {os.cpu_count()}")
    print(f"{'trainer':32} {'step (s)':>9} {'images/s':>9} {'peak RSS MiB':>13} "
          f"{'fixed (s)':>10} {'vs ' + ref['trainer']:>12}")
    for r in rows:
        r["ratio"] = ratio(ref["step_s"], r["step_s"])
        rounds = "rounds: " + ", ".join(f"{x:.4f}" for x in r["rounds_step_s"])
        if r["invalid"]:
            print(f"{r['trainer']:32} {'invalid':>9} {'':9} {r['peak_rss_mib']:13d} "
                  f"{r['fixed_s']:10.1f} {'':>12}   {rounds}  ({r['invalid']})")
            continue
        shown = f"{r['ratio']:11.2f}x" if r["ratio"] else f"{'n/a':>12}"
        print(f"{r['trainer']:32} {r['step_s']:9.4f} {r['images_s']:9.1f} {r['peak_rss_mib']:13d} "
              f"{r['fixed_s']:10.1f} {shown}   {rounds}")
    print("fixed (s): the child's wall time less its steps at the measured rate (start-up, "
          "loading, caching, compiling, the warm-up's excess)")
    # the last round's run of each trainer: a faster variant must still learn the same
    losses = {name: cnexp_losses(run_directory(work, f"{name}-l{args.rounds - 1}"))
              for name in variants if name != PEER}
    if PEER in variants:
        last_peer = next(r for r in reversed(results) if r["name"] == PEER)
        losses[PEER] = peer_losses("".join(last_peer["outputs"]))
    for name, curve in losses.items():
        if curve:
            n = len(curve)
            print(f"loss {name}: first half {statistics.mean(curve[:n // 2]):.4f}, "
                  f"second half {statistics.mean(curve[n // 2:]):.4f} ({n} values)")
    return rows

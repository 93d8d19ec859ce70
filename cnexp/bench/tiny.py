"""Training throughput: cnexp side by side with diffusers' examples/controlnet/train_controlnet.py.

    python -m cnexp.bench [--diffusers-src ~/src/diffusers] [--steps 60] [--rounds 2] [--levers compile,unfused,workers] [--default-run]
    python -m cnexp.bench --sd 15 [--width 1.0] [--resolution 512] [--batch 8] ...   (sd.py)

Both trainers get the same tiny-world base, the same 256 training triples (64 px), batch size,
fp32, AdamW (lr 1e-3), and the same ControlNet architecture. Each is run as a subprocess for
`warmup` and for `warmup + steps` optimizer steps, alternately; the difference of the two wall
times divided by `steps` is the steady-state step time (start-up, loading and the first steps
cancel out). Peak RSS is the child's max resident set. Without --diffusers-src only cnexp's own
variants are measured (with and without the frozen-encoder cache). The cache is on disk
(cache.dir in the work directory): one short cnexp run fills it before the timed runs.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BATCH, LR, N_TRAIN = 16, 1e-3, 256
LEVERS = {"compile": "trainer.compile=true", "workers": "data.num_workers=2",
          # the defaults, taken back one at a time
          "unfused": "optim.fused=false"}


def _run(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) and stdout+stderr of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"benchmark child failed: {' '.join(cmd)}\n{output[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, output


def cnexp_cmd(steps: int, out: Path, data: Path, cache: bool, *extra: str) -> list[str]:
    return [sys.executable, "run.py", f"hydra.run.dir={out}", f"trainer.max_steps={steps}",
            f"data.root={data}", f"data.train_size={N_TRAIN}", "data.val_size=8",
            "data.test_size=8", f"data.batch_size={BATCH}", f"optim.lr={LR}",
            "optim.prompt_dropout=0.5", f"cache.latents={cache}", f"cache.text={cache}",
            f"cache.dir={data.parent / 'encoders'}", "eval.enabled=false", "export=false",
            "logger.mode=disabled", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1", *extra]


def peer_cmd(script: Path, steps: int, out: Path, parquet_dir: Path, controlnet: Path) -> list[str]:
    return [sys.executable, str(script), f"--pretrained_model_name_or_path={ROOT / 'assets/tinyworld'}",
            f"--controlnet_model_name_or_path={controlnet}", f"--output_dir={out}",
            f"--train_data_dir={parquet_dir}", "--image_column=image",
            "--conditioning_image_column=conditioning_image", "--caption_column=text",
            "--resolution=64", f"--train_batch_size={BATCH}", f"--max_train_steps={steps}",
            f"--learning_rate={LR}", "--proportion_empty_prompts=0.5", "--seed=0",
            "--checkpointing_steps=100000", "--report_to=wandb", "--mixed_precision=no",
            "--max_grad_norm=1.0", "--adam_weight_decay=1e-2"]


def prepare_peer_inputs(work: Path, data: Path, bundle: Path = ROOT / "assets/tinyworld",
                        channels: tuple = (16, 32, 64)) -> tuple[Path, Path]:
    """The same triples as parquet with diffusers' column names, and the same initial ControlNet."""
    import datasets
    from diffusers import ControlNetModel, UNet2DConditionModel

    from cnexp.data.fill50k import read_index

    records = read_index(data / "train")
    table = {"image": [str(data / "train" / r["target"]) for r in records],
             "conditioning_image": [str(data / "train" / r["source"]) for r in records],
             "text": [r["prompt"] for r in records]}
    ds = datasets.Dataset.from_dict(table)
    ds = ds.cast_column("image", datasets.Image()).cast_column("conditioning_image", datasets.Image())
    parquet_dir = work / "parquet"
    parquet_dir.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(parquet_dir / "train.parquet"))
    unet = UNet2DConditionModel.from_pretrained(bundle, subfolder="unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    controlnet.save_pretrained(work / "controlnet_init")
    return parquet_dir, work / "controlnet_init"


def run_directory(work: Path, tag: str) -> Path:
    return work / "runs" / re.sub(r"[^A-Za-z0-9]+", "_", tag)


def cnexp_losses(out: Path) -> list[float]:
    rows = csv.DictReader((out / "csv" / "metrics.csv").open())
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def peer_losses(output: str) -> list[float]:
    """The script's tqdm postfix (`loss=0.0561, lr=...`): most steps, as the bar refreshes."""
    return [float(x) for x in re.findall(r"(?<![_a-z])loss=([0-9.]+(?:e-?[0-9]+)?)", output)]


def measure(name: str, make_cmd, warmup: int, steps: int, rnd: int, env: dict) -> dict:
    """One round: a short and a long run; their difference is `steps` steady-state steps."""
    short, _, _ = _run(make_cmd(warmup, f"{name}-w{rnd}"), env)
    long, peak, output = _run(make_cmd(warmup + steps, f"{name}-l{rnd}"), env)
    step = (long - short) / steps
    return {"name": name, "step_s": step, "images_s": BATCH / step, "peak_rss_mib": peak,
            "fixed_s": short - warmup * step,  # start-up, loading, caching, compiling
            "outputs": [output]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers-src", type=Path, help="a diffusers source checkout")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--levers", default="",
                        help="comma list of cnexp levers to measure too: " + ", ".join(LEVERS))
    parser.add_argument("--default-run", action="store_true",
                        help="also run the default experiment (python run.py) and report its "
                             "wall time, evaluation share and peak RSS")
    sd = parser.add_argument_group("SD-shaped mode (random weights; bench_sd.py)")
    sd.add_argument("--sd", choices=["15", "21"], help="SD 1.5- or 2.1-shaped bundle")
    sd.add_argument("--width", type=float, default=1.0,
                    help="channel scale (1.0: the published sizes; e.g. 0.05 for a CPU smoke run)")
    sd.add_argument("--resolution", type=int, help="pixels (default: the base's, 512 / 768)")
    sd.add_argument("--batch", type=int, default=8, help="images per step")
    sd.add_argument("--images", type=int, default=N_TRAIN, help="training triples")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cnexp-bench-"))
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    if args.diffusers_src:
        script = args.diffusers_src / "examples" / "controlnet" / "train_controlnet.py"
        if not script.exists():
            sys.exit(f"--diffusers-src: {script} not found (give the root of a diffusers checkout)")
    if args.sd:
        from cnexp.bench.sd import run_sd, write_json

        rows, setup = run_sd(args, work, env)
        if args.json:
            write_json(args.json, rows, setup)
        return

    from cnexp.tinyworld.shapes import ensure_tiny_dataset

    data = ensure_tiny_dataset(work / "data", {"train": N_TRAIN, "val": 8, "test": 8})

    def run_dir(tag):
        return run_directory(work, tag)

    variants = {
        "cnexp": lambda n, tag: cnexp_cmd(n, run_dir(tag), data, cache=True),
        "cnexp (no cache)": lambda n, tag: cnexp_cmd(n, run_dir(tag), data, cache=False),
    }
    for lever in filter(None, args.levers.split(",")):  # each alone, on top of the default
        if lever not in LEVERS:
            sys.exit(f"--levers: unknown lever {lever!r}; choose from {', '.join(LEVERS)}")
        name, knob = f"cnexp + {LEVERS[lever]}", LEVERS[lever]
        variants[name] = lambda n, tag, knob=knob: cnexp_cmd(n, run_dir(tag), data, True, knob)
    if args.diffusers_src:
        parquet_dir, controlnet = prepare_peer_inputs(work, data)
        variants["diffusers train_controlnet.py"] = lambda n, tag: peer_cmd(
            script, n, run_dir(tag), parquet_dir, controlnet)

    _run(variants["cnexp"](1, "prime"), env)  # fills the disk cache the timed runs share
    results = []
    for rnd in range(args.rounds):  # alternate the trainers so drifts hit all of them alike
        for name, make in variants.items():
            res = measure(name, make, args.warmup, args.steps, rnd, env)
            results.append({**res, "round": rnd})
    table = summarize(results, variants, work, args)
    if args.default_run:
        table.append(default_run(work / "runs" / "default", env))
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


def default_run(out: Path, env: dict) -> dict:
    """The default experiment, unchanged: how much of its wall time evaluation takes."""
    wall, peak, _ = _run([sys.executable, "run.py", f"hydra.run.dir={out}",
                          "trainer.enable_progress_bar=false"], env)
    summary = json.loads((out / "metrics.json").read_text())
    row = {"trainer": "default run (python run.py)", "wall_s": round(wall, 1),
           "eval_s": summary["eval_seconds"], "eval_share": summary["eval_share"],
           "peak_rss_mib": round(peak)}
    print(f"default run: {row['wall_s']} s wall, evaluation {row['eval_s']} s = "
          f"{100 * row['eval_share']:.0f}% of training+evaluation, peak RSS {row['peak_rss_mib']} MiB")
    return row


def summarize(results: list[dict], variants: dict, work: Path, args) -> list[dict]:
    peer = "diffusers train_controlnet.py"
    rows = []
    for name in variants:
        mine = [r for r in results if r["name"] == name]
        step = statistics.median(r["step_s"] for r in mine)
        rows.append({"trainer": name, "step_s": round(step, 4), "images_s": round(BATCH / step, 1),
                     "peak_rss_mib": round(max(r["peak_rss_mib"] for r in mine)),
                     "fixed_s": round(statistics.median(r["fixed_s"] for r in mine), 1),
                     "rounds_step_s": [round(r["step_s"], 4) for r in mine]})
    ref = next((r for r in rows if r["trainer"] == peer), rows[1])
    print(f"\nsteady-state training, tiny world 64 px, batch {BATCH}, fp32, "
          f"{args.steps} timed steps x {args.rounds} rounds, torch threads {os.cpu_count()}")
    print(f"{'trainer':32} {'step (s)':>9} {'images/s':>9} {'peak RSS MiB':>13} "
          f"{'fixed (s)':>10} {'vs ' + ref['trainer']:>12}")
    for r in rows:
        r["ratio"] = round(ref["step_s"] / r["step_s"], 2)
        print(f"{r['trainer']:32} {r['step_s']:9.4f} {r['images_s']:9.1f} {r['peak_rss_mib']:13d} "
              f"{r['fixed_s']:10.1f} {r['ratio']:11.2f}x   rounds: "
              + ", ".join(f"{x:.4f}" for x in r["rounds_step_s"]))
    print("fixed (s): start-up, loading, caching and compiling, outside the steady state")
    # the last round's long run of each trainer: a faster variant must still learn the same
    losses = {name: cnexp_losses(run_directory(work, f"{name}-l{args.rounds - 1}"))
              for name in variants if name != peer}
    if peer in variants:
        last_peer = next(r for r in reversed(results) if r["name"] == peer)
        losses[peer] = peer_losses("".join(last_peer["outputs"]))
    for name, curve in losses.items():
        if curve:
            n = len(curve)
            print(f"loss {name}: first half {statistics.mean(curve[:n // 2]):.4f}, "
                  f"second half {statistics.mean(curve[n // 2:]):.4f} ({n} values)")
    return rows


if __name__ == "__main__":
    main()

"""What the benchmark's modes share: running a trainer as a child process under the step clock
(child.py), one round's measurement, and when a figure may be printed at all (judge).

A figure is the steady-state step time measured inside the child: the clock starts when step
`warmup` ends and stops when step `warmup + steps` ends, so start-up, loading, the cache fill and
compilation never enter it, and nothing is subtracted across processes (a difference of two
processes' wall times printed -0.73 s/step when one compiled cold and the other found the
compile cache warm). A trainer's figure is the median of its rounds; it is invalid, and no ratio
is printed for it, when a round is not positive or the rounds disagree by more than
`tolerance` (max / min - 1). The family mode (families.py) judges with no tolerance and compares
trainers by their paired ratios instead (`paired`: round by round, the median and its range), so
a noisy neighbour widens the range rather than voiding the figure.
"""
from __future__ import annotations

import csv
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cnexp.bench.child import CLOCK_ENV, read_clock
from cnexp.run.record import CSV_FILE

ROOT = Path(__file__).resolve().parents[2]
LR = 1e-3
PEER = "diffusers train_controlnet.py"
TOLERANCE = 0.25  # rounds of one trainer may differ by 25 % (max / min) on a shared machine
LEVERS = {"compile": "trainer.compile=true", "workers": "data.num_workers=2",
          # the defaults, taken back one at a time
          "unfused": "optim.fused=false"}


def child_cmd(script: str | Path, *args: str) -> list[str]:
    """`script args` run as __main__ under the step clock and the peak-memory probe."""
    return [sys.executable, "-m", "cnexp.bench.child", str(script), *args]


def run_child(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) and stdout+stderr of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"benchmark child failed: {' '.join(cmd)}\n{output[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, output


def measure(name: str, make_cmd, warmup: int, steps: int, rnd: int, env: dict) -> dict:
    """One round of one trainer: a run of warmup + steps steps, timed inside the child."""
    wall, peak, output = run_child(make_cmd(warmup + steps, f"{name}-l{rnd}"),
                                   {**env, CLOCK_ENV: f"{warmup},{steps}"})
    clock = read_clock(output)
    if clock is None:
        raise RuntimeError(f"{name}: the child printed no step clock (did it run "
                           f"{warmup + steps} optimizer steps?)\n{output[-3000:]}")
    step = clock["seconds"] / steps
    print(f"round {rnd}  {name:34} {step:.4f} s/step (in-process, steps {warmup + 1}.."
          f"{warmup + steps})", flush=True)
    return {"name": name, "step_s": step, "peak_rss_mib": peak, "outputs": [output],
            "fixed_s": wall - (warmup + steps) * step,  # start-up, loading, caching, compiling
            "step_deltas": clock["deltas"],
            "cpu_step_s": clock["cpu"] / steps if clock.get("cpu") is not None else None}


def judge(rounds: list[float], tolerance: float | None = TOLERANCE
          ) -> tuple[float | None, str | None]:
    """(the median of the rounds, None), or (None, why the figure is invalid). tolerance=None:
    rounds that disagree still give their median (the paired ratios carry the spread)."""
    if not rounds:
        return None, "no rounds"
    bad = [r for r in rounds if not (math.isfinite(r) and r > 0)]
    if bad:
        return None, f"a round measured {bad[0]:.4f} s/step"
    spread = max(rounds) / min(rounds) - 1
    if tolerance is not None and spread > tolerance:
        return None, f"rounds disagree by {spread:.0%} (> {tolerance:.0%})"
    return statistics.median(rounds), None


def paired(numerators: list[float], denominators: list[float]) -> dict | None:
    """Round-by-round ratios of two trainers measured in the same rounds (round r of each run
    back to back, so a drift of the machine hits both): {"median", "low", "high", "rounds"},
    or None where a round of either is missing or not positive."""
    if not numerators or len(numerators) != len(denominators):
        return None
    if not all(math.isfinite(x) and x > 0 for x in (*numerators, *denominators)):
        return None
    ratios = [a / b for a, b in zip(numerators, denominators)]
    return {"median": round(statistics.median(ratios), 3), "low": round(min(ratios), 3),
            "high": round(max(ratios), 3), "rounds": [round(r, 3) for r in ratios]}


def ratio(reference: float | None, step: float | None) -> float | None:
    """The reference's step time over this one (> 1: faster), where both figures are valid."""
    return round(reference / step, 2) if reference and step else None


def run_directory(work: Path, tag: str) -> Path:
    return work / "runs" / re.sub(r"[^A-Za-z0-9]+", "_", tag)


def cnexp_losses(out: Path) -> list[float]:
    rows = csv.DictReader((out / CSV_FILE).open())
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def peer_table(data: Path) -> dict[str, list[str]]:
    """The training triples under diffusers' column names: image and conditioning_image (file
    paths), text."""
    from cnexp.data.fill50k import read_index

    records = read_index(data / "train")
    return {"image": [str(data / "train" / r["target"]) for r in records],
            "conditioning_image": [str(data / "train" / r["source"]) for r in records],
            "text": [r["prompt"] for r in records]}


def write_peer_parquet(work: Path, data: Path) -> Path:
    """The triples as a parquet directory with the images embedded (--train_data_dir)."""
    import datasets

    ds = datasets.Dataset.from_dict(peer_table(data))
    ds = ds.cast_column("image", datasets.Image()).cast_column("conditioning_image",
                                                               datasets.Image())
    parquet_dir = work / "parquet"
    parquet_dir.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(parquet_dir / "train.parquet"))
    return parquet_dir


def prepare_peer_inputs(work: Path, data: Path, bundle: Path = ROOT / "assets/tinyworld",
                        channels: tuple = (16, 32, 64)) -> tuple[Path, Path]:
    """The same triples as parquet with diffusers' column names, and the same initial ControlNet."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    parquet_dir = write_peer_parquet(work, data)
    unet = UNet2DConditionModel.from_pretrained(bundle, subfolder="unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    controlnet.save_pretrained(work / "controlnet_init")
    return parquet_dir, work / "controlnet_init"

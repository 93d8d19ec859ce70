"""python -m cnexp.bench.child SCRIPT [ARGS...]: run a trainer (run.py, diffusers'
train_controlnet.py) as __main__ under the benchmark's two probes, without changing it:

- the step clock (with CNEXP_BENCH_CLOCK="warmup,steps" in the environment): a global
  optimizer-step hook timestamps every optimizer step; the clock starts when step `warmup` ends
  and stops when step `warmup + steps` ends, and the child prints `CNEXP_CLOCK seconds=...`
  with the per-step intervals and the process's CPU seconds over the window (`cpu=`: user +
  system time of all its threads; a neighbour's load slows the wall clock more than it adds
  to this). On a GPU the two ends synchronize the device (twice per run, not
  per step), so queued work is counted where it runs; the steps between are timestamped on the
  host without a sync, so the trainer's own behaviour is not changed.
- peak GPU memory at exit (torch.cuda.max_memory_allocated), with the device's name.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import runpy
import sys
import time
from pathlib import Path

CLOCK_ENV = "CNEXP_BENCH_CLOCK"
CLOCK_MARK = "CNEXP_CLOCK"
MARK = "CNEXP_PEAK"


def _synchronize() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def install_clock(warmup: int, steps: int) -> list[float]:
    """Timestamps (perf_counter) of the ends of steps warmup, warmup + 1, ..., warmup + steps."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    marks: list[float] = []
    cpu: list[float] = []  # process_time at the window's two ends
    done = [0]

    def after_step(optimizer, args, kwargs) -> None:
        done[0] += 1
        if done[0] in (warmup, warmup + steps):
            _synchronize()  # the window's ends only: the device's queue is counted in full
        if warmup <= done[0] <= warmup + steps:
            marks.append(time.perf_counter())
        if done[0] in (warmup, warmup + steps):
            cpu.append(time.process_time())
        if done[0] == warmup + steps:
            deltas = [round(b - a, 6) for a, b in zip(marks, marks[1:])]
            print(f"{CLOCK_MARK} seconds={marks[-1] - marks[0]:.6f} steps={steps} "
                  f"deltas={json.dumps(deltas)} cpu={cpu[-1] - cpu[0]:.6f}", flush=True)

    register_optimizer_step_post_hook(after_step)
    return marks


def read_clock(output: str) -> dict | None:
    """{"seconds": window seconds, "steps": n, "deltas": per-step seconds, "cpu": the window's
    CPU seconds or None} from a child's output."""
    found = re.findall(rf"{CLOCK_MARK} seconds=([0-9.]+) steps=(\d+) deltas=(\[[^\]]*\])"
                       r"(?: cpu=([0-9.]+))?", output)
    if not found:
        return None
    seconds, steps, deltas, cpu = found[-1]
    return {"seconds": float(seconds), "steps": int(steps), "deltas": json.loads(deltas),
            "cpu": float(cpu) if cpu else None}


def _report_peak() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        print(f"{MARK} device={torch.cuda.get_device_name()!r} "
              f"gpu_bytes={torch.cuda.max_memory_allocated()}", flush=True)


def main() -> None:
    script = Path(sys.argv[1]).resolve()
    sys.argv = [str(script), *sys.argv[2:]]
    sys.path.insert(0, str(script.parent))
    if os.environ.get(CLOCK_ENV):
        warmup, steps = (int(x) for x in os.environ[CLOCK_ENV].split(","))
        install_clock(warmup, steps)
    atexit.register(_report_peak)
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()

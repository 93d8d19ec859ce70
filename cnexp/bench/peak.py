"""python -m cnexp.bench.peak SCRIPT [ARGS...]: run SCRIPT as __main__, then print the device it ran
on and its peak GPU memory (torch.cuda.max_memory_allocated), for the benchmark to read.

The benchmark wraps both trainers (run.py and diffusers' train_controlnet.py) in it, so their
peaks are measured the same way without changing either.
"""
from __future__ import annotations

import atexit
import runpy
import sys
from pathlib import Path

MARK = "CNEXP_PEAK"


def _report() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        print(f"{MARK} device={torch.cuda.get_device_name()!r} "
              f"gpu_bytes={torch.cuda.max_memory_allocated()}", flush=True)


def main() -> None:
    script = Path(sys.argv[1]).resolve()
    sys.argv = [str(script), *sys.argv[2:]]
    sys.path.insert(0, str(script.parent))
    atexit.register(_report)
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()

"""`python -m cnexp.bench`: training throughput, cnexp beside diffusers' train_controlnet.py.

    python -m cnexp.bench [--diffusers-src ~/src/diffusers] [--steps 60] [--rounds 2] [--levers compile,unfused,workers] [--default-run]
    python -m cnexp.bench --sd 15 [--width 1.0] [--resolution 512] [--batch 8] ...
    python -m cnexp.bench --family sd|sdxl|sd3|flux [--diffusers-src ~/src/diffusers] [--rounds 5]

Modes: the tiny world (tiny.py, the default), an SD-shaped random bundle (`--sd`, sd.py) and a
family's tiny bundle beside its diffusers script and the bare loop (`--family`, families.py);
__main__.py sends other modes (`--loader`: loader.py) to their own programs. A new mode is a
module with a `run_<mode>(args, work, env)` and a flag here (or its own main, as loader.py).
What they share (the child processes, the in-process step clock, when a figure is valid):
common.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from cnexp.bench.common import LEVERS, TOLERANCE
from cnexp.bench.families import PEERS
from cnexp.bench.tiny import N_TRAIN


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers-src", type=Path, help="a diffusers source checkout")
    parser.add_argument("--warmup", type=int, default=20,
                        help="steps before the clock starts (start-up, caches, compilation)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help="rounds of one trainer disagreeing by more (max/min - 1) make its "
                             f"figure invalid (default {TOLERANCE})")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--levers", default="",
                        help="comma list of cnexp levers to measure too: " + ", ".join(LEVERS))
    parser.add_argument("--default-run", action="store_true",
                        help="also run the default experiment (python run.py) and report its "
                             "wall time, evaluation share and peak RSS")
    sd = parser.add_argument_group("SD-shaped mode (random weights; sd.py)")
    sd.add_argument("--sd", choices=["15", "21"], help="SD 1.5- or 2.1-shaped bundle")
    sd.add_argument("--width", type=float, default=1.0,
                    help="channel scale (1.0: the published sizes; e.g. 0.05 for a CPU smoke run)")
    sd.add_argument("--resolution", type=int, help="pixels (default: the base's, 512 / 768)")
    sd.add_argument("--batch", type=int, default=8, help="images per step")
    sd.add_argument("--images", type=int, default=N_TRAIN, help="training triples")
    family = parser.add_argument_group("family mode (families.py)")
    family.add_argument("--family", choices=sorted(PEERS),
                        help="the family's tiny bundle: cnexp, diffusers' train_controlnet_"
                             "<family>.py (with --diffusers-src) and the bare loop, interleaved "
                             "rounds, paired ratios")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        sys.exit("--warmup, --steps and --rounds must be at least 1")
    for lever in filter(None, args.levers.split(",")):
        if lever not in LEVERS:
            sys.exit(f"--levers: unknown lever {lever!r}; choose from {', '.join(LEVERS)}")
    if args.family:
        from cnexp.bench.families import check_family

        why = check_family(args.family, args.diffusers_src)
        if why:
            sys.exit(why)
    elif args.diffusers_src:
        script = args.diffusers_src / "examples" / "controlnet" / "train_controlnet.py"
        if not script.exists():
            sys.exit(f"--diffusers-src: {script} not found (give the root of a diffusers checkout)")
    work = Path(tempfile.mkdtemp(prefix="cnexp-bench-"))  # bundles, data, runs: removed after
    try:
        run_mode(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_mode(args, work: Path) -> None:
    """The benchmark `args` asks for, its files under `work`."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    if args.family:
        from cnexp.bench.families import run_family

        report = run_family(args, work, env)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        return
    if args.sd:
        from cnexp.bench.sd import run_sd, write_json

        rows, setup = run_sd(args, work, env)
        if args.json:
            write_json(args.json, rows, setup)
        return
    from cnexp.bench.tiny import run_tiny

    table = run_tiny(args, work, env)
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))

"""Reading a sweep's overrides and a run's knobs, and a job's name: shared by the training side
(job names, W&B tags: cnexp/run/naming.py) and the analysis side (which knobs a sweep varied, a
job's ablation and seed from its directory's name: cnexp/analysis/)."""
from __future__ import annotations

import functools
import hashlib
import logging
import re
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

log = logging.getLogger("cnexp")


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


# Keys that differ between any two runs without being an ablation knob.
# ckpt_path says how a run was resumed, hydra.* where it ran: neither changes what it trains.
NOT_KNOBS = ("ablation", "seed", "paths.", "logger.", "ckpt_path", "hydra.")


def knob_diff(config: dict, baseline: dict) -> dict[str, Any]:
    """Flattened keys whose value in `config` differs from `baseline` (a missing key: None)."""
    flat, flat_base = flatten(config), flatten(baseline)
    diff = {}
    for key in sorted(flat.keys() | flat_base.keys()):
        if key.startswith(NOT_KNOBS) or key in NOT_KNOBS:
            continue
        if flat.get(key) != flat_base.get(key):
            diff[key] = flat.get(key)
    return diff


def sweep_overrides(hydra: dict) -> list:
    """The sweep overrides (command line and hydra.sweeper.params) of multirun.yaml's `hydra`
    section, parsed by Hydra; raises what the parser raises."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = (hydra.get("sweeper") or {}).get("params") or {}
    lines = [*(f"{k}={v}" for k, v in params.items()), *hydra["overrides"]["task"]]
    return [o for o in OverridesParser.create().parse_overrides(lines) if o.is_sweep_override()]


@functools.lru_cache(maxsize=8)
def swept_keys(sweep_dir: str) -> Optional[frozenset]:
    """Keys the multirun gives several values, read from the multirun.yaml Hydra's sweeper
    writes before launching; None when it cannot be read."""
    try:
        hydra = OmegaConf.to_container(OmegaConf.load(Path(sweep_dir) / "multirun.yaml").hydra)
        return frozenset(o.key_or_group for o in sweep_overrides(hydra))
    except Exception as err:  # noqa: BLE001 - a name must not stop a job; fall back below
        log.debug("could not read the swept keys of %s: %s", sweep_dir, err)
        return None


# A job's name: <ablation>-s<seed>, then the other swept overrides as key=value (last part of
# the key), e.g. baseline-s0_branch=lite. Characters a path or URL would misread become "-";
# when that or the length cap loses anything, "~" + a hash of the overrides keeps names unique.
NAMED_ELSEWHERE = ("ablation", "seed")
# read back by cnexp/analysis/runs.py: 3_baseline-s1, 3_baseline-s1_lr=1e-4 (<number>_ from Hydra)
JOB_DIR_NAME = re.compile(r"^(?:\d+_)?(?P<ablation>.+?)-s(?P<seed>\d+)(?:_(?P<knobs>.*=.*))?$")
KNOBS_MAX = 60
UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


def job_stem(ablation: str, seed: int) -> str:
    return f"{ablation}-s{seed}"


def knobs_suffix(task_overrides: list[str], swept: Optional[frozenset]) -> str:
    """`_key=value...` of the job's overrides of swept keys (all of its knob overrides when the
    swept ones are unknown), or "" when there are none."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parts = []
    for override in OverridesParser.create().parse_overrides(list(task_overrides)):
        key = override.key_or_group
        if key in NAMED_ELSEWHERE or (swept is not None and key not in swept) or \
                (swept is None and key.startswith(NOT_KNOBS)):
            continue
        value = override.get_value_element_as_str()
        parts.append(f"{key.replace('/', '.').split('.')[-1]}={value}")
    raw = "_".join(parts)
    safe = UNSAFE.sub("-", raw)
    if safe != raw or len(safe) > KNOBS_MAX:
        safe = safe[:KNOBS_MAX - 7] + "~" + hashlib.sha1(raw.encode()).hexdigest()[:6]
    return "_" + safe if safe else ""

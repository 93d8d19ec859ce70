"""Where a model is: a local directory, the Hugging Face cache, or only the hub (if the hub
answers, as cnexp.base decides it). For checks made before a run loads anything
(cnexp/launch/plan.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def locate(source: str, probe_file: str) -> tuple[Optional[str], str]:
    """(a directory or file that holds `probe_file`, how it was found) for a local directory or
    a hub id: (None, why) when neither the disk nor the hub has it."""
    local = Path(source).expanduser()
    if local.is_dir():
        found = local / probe_file
        return (str(local), "local directory") if found.exists() else \
            (None, f"the directory {local} has no {probe_file}")
    if local.is_absolute() or source.startswith((".", "~")) or source.count("/") != 1:
        return None, f"no directory {local}, and not a hub id (owner/name)"
    from huggingface_hub import try_to_load_from_cache

    from cnexp.base import hub_cache_dir, hub_reachable  # the run's own decision: they agree

    cached = try_to_load_from_cache(source, probe_file)
    if isinstance(cached, str):
        return str(Path(cached).parent), "in the Hugging Face cache"
    reachable, why = hub_reachable(source)
    if reachable:
        return source, "on the hub (downloaded on first use)"
    return None, f"not in the Hugging Face cache ({hub_cache_dir()}) and the hub is " \
        f"unreachable: {why}"


def read_json(where: Optional[str], name: str) -> Optional[dict]:
    """A bundle's json file from a local directory or the Hugging Face cache; None if absent."""
    if where is None:
        return None
    path = Path(where) / name
    if not path.exists() and "/" in where and not Path(where).exists():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(where, name)
        path = Path(cached) if isinstance(cached, str) else path
    return json.loads(path.read_text()) if path.exists() else None

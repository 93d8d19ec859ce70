"""Loading a family's bundle: where base.pretrained points (a local pipeline directory, built
first when base.random_bundle asks, or a hub id), each component from its subfolder, frozen."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from cnexp.base import BaseBundle, unavailable, use_local_cache
from cnexp.config import BaseConfig
from cnexp.families.family import BaseFamily


def pipeline_source(cfg: BaseConfig, family: BaseFamily) -> tuple[str, bool]:
    """(where the bundle is, whether to read only local files) for base.pretrained: a local
    diffusers pipeline directory (built first if base.random_bundle) or a hub id."""
    source = cfg.pretrained
    local = Path(source).expanduser()
    if getattr(cfg, "random_bundle", False) and not (local / "model_index.json").exists():
        build_atomically(family, local)
    if local.is_dir():
        if not (local / "model_index.json").exists():
            raise unavailable(source, "the directory has no model_index.json, so it is not "
                              "a diffusers pipeline bundle")
        return str(local), True
    if local.is_absolute() or source.startswith((".", "~")) or source.count("/") != 1:
        raise unavailable(source, "no such directory, and it is not a hub id of the form "
                          "owner/name")
    return source, use_local_cache(source, cfg.revision)


def build_atomically(family: BaseFamily, directory: Path) -> None:
    """Build the family's tiny bundle beside `directory`, then rename it into place: a run
    started at the same time sees no bundle or a whole one, never half of one."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    family.build_tiny(partial)
    try:
        os.rename(partial, directory)
    except OSError:  # another run renamed its (identical) build first
        shutil.rmtree(partial, ignore_errors=True)


def load_parts(cfg: BaseConfig, family: BaseFamily, parts: dict[str, type],
               optional: tuple[str, ...] = ()) -> dict:
    """name -> each component `parts` names, loaded from the subfolder of that name (weights in
    base.variant when the class takes one); `optional` parts missing from the bundle are None
    (SD3 without its T5). One BaseModelUnavailable naming the fix otherwise."""
    source, local_only = pipeline_source(cfg, family)
    loaded = {}
    try:
        for name, kind in parts.items():
            kwargs = {"revision": cfg.revision, "local_files_only": local_only}
            if hasattr(kind, "_supports_gradient_checkpointing") or name == "vae":
                kwargs["variant"] = cfg.variant  # diffusers models: weight variants
            if name in optional and Path(source).is_dir() and not (Path(source) / name).is_dir():
                loaded[name] = None
                continue
            loaded[name] = kind.from_pretrained(source, subfolder=name, **kwargs)
    except (OSError, ValueError) as err:  # hub unreachable, gated, missing files
        hint = ("the hub is unreachable and it is not in the local cache"
                if local_only and not Path(source).is_dir() else str(err).splitlines()[0])
        raise unavailable(cfg.pretrained, hint) from None
    loaded["source"] = source
    return loaded


def freeze(family: BaseFamily, base: BaseBundle) -> BaseBundle:
    """No gradients and eval mode for every frozen network of `base`."""
    for model in family.frozen(base):
        model.requires_grad_(False)
        model.eval()
    return base

"""The data check's command line: `python -m cnexp.data.check [the overrides run.py takes]`
(cnexp/data/check.py's docstring says what it reports and refuses)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from cnexp.data import check


def compose(overrides: list[str]):
    """The config run.py would compose from `overrides` (paths.root: the working directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    from cnexp.config import PROJECT_ROOT, register_configs

    register_configs()
    given = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    implicit = [] if "paths.root" in given else [f"paths.root={Path.cwd()}"]
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=[*implicit, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path.cwd())  # not used: nothing is written but the cache
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Print the report for the data `python run.py <argv>` would train on; exit code 2 if a
    run would refuse it (as run.py exits on a user error), 0 otherwise."""
    from cnexp.data.caption_check import tokenizer_lines
    from cnexp.data.layout import open_sources
    from cnexp.errors import CnexpError
    from cnexp.tinyworld.shapes import ensure_tiny_dataset

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(check.__doc__)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        cfg = compose(argv)
        data = cfg.data
        from cnexp.config import DataConfig
        from cnexp.validate import fail, ranged_fields

        for key, value, allowed in ranged_fields(data, DataConfig, "data."):
            if value is not None and not allowed.ok(value):  # as run.py checks them
                fail(key, f"is {value}; {allowed.reason(value)}")
        if data.generate_tinyworld:
            ensure_tiny_dataset(Path(data.root), {"train": data.train_size,
                                                  "val": data.val_size, "test": data.test_size})
        checked = check.DataCheck(open_sources(data, data.cache_dir), data, data.cache_dir).decide()
    except CnexpError as err:
        print(f"data check: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # Hydra's composition errors (a mistyped knob): its message
        if type(err).__module__.startswith(("hydra", "omegaconf")):
            print(f"data check: {err}", file=sys.stderr)
            return 2
        raise
    print("\n".join(checked.report + tokenizer_lines(cfg, checked)))
    for message in checked.warnings:
        print(f"warning: {message}")
    if checked.refusals:
        print("refused (a training run stops here):\n  " + "\n  ".join(checked.refusals))
        return 2
    return 0


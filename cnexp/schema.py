"""The schema is closed: every key of a run's config is a knob that cnexp/config.py declares.

Hydra's structured schema refuses an unknown key (`control.conector=x`) at composition, but its
message then suggests `+control.conector=x`, which Hydra accepts: the key is added, nothing reads
it, and the run trains the default in silence. Two checks close that door, both naming the nearest
knob ("did you mean control.connector?"):

- `unknown_knobs(cfg)`: the composed config (cnexp/validate.py runs it, so the run and
  `cnexp.plan` refuse the same keys);
- `check_command_line(argv)`: run.py's command line before Hydra composes it, so cnexp's message
  comes before Hydra's `use +...` hint, and a `+`-added key stops before a run directory exists.

Config groups (`+ablation=NAME`, `+sweep=NAME`, `base=sd15`, `hydra/launcher=...`) and `hydra.*`
are Hydra's to check; only keys are refused. Keys under a dict knob (`data.annotator_params.*`)
are free: that knob holds whatever its consumer takes.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import typing
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from cnexp.config import PROJECT_ROOT, TrainConfig
from cnexp.errors import ConfigError

CONF = PROJECT_ROOT / "conf"


@functools.lru_cache(maxsize=None)
def _sections(schema: type) -> dict[str, Optional[type]]:
    """field name -> its dataclass (a section), dict (free keys below), list (items by index
    below: eval.prompt_settings.0) or None (a value)."""
    hints = typing.get_type_hints(schema)
    kinds = {}
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        while typing.get_origin(kind) is typing.Union:  # Optional[X]: X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        origin = typing.get_origin(kind) or kind
        kinds[f.name] = kind if dataclasses.is_dataclass(kind) else \
            dict if origin is dict else list if origin is list else None
    return kinds


@functools.lru_cache(maxsize=1)
def knob_names() -> tuple[str, ...]:
    """Every knob's dotted name (sections' fields, dict knobs themselves)."""
    def walk(schema: type, prefix: str):
        for name, kind in _sections(schema).items():
            if dataclasses.is_dataclass(kind):
                yield from walk(kind, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"
    return tuple(walk(TrainConfig, ""))


def is_knob(key: str) -> bool:
    """`key` names a knob, a section, or a key under a dict knob."""
    schema: Any = TrainConfig
    for part in key.split("."):
        if schema is list and part.isdigit():  # an item of a list knob, as Hydra allows
            schema = None
            continue
        if not dataclasses.is_dataclass(schema):
            return schema is dict  # below a dict knob: free; below a value: no such key
        kinds = _sections(schema)
        if part not in kinds:
            return False
        schema = kinds[part]
    return True


def nearest_knobs(key: str) -> list[str]:
    """The knobs `key` most likely meant: a close name in its own section (control.conector ->
    control.connector), else the same name in another section (trainer.batch_size)."""
    section, _, leaf = key.rpartition(".")
    by_leaf: dict[str, list[str]] = {}
    for knob in knob_names():
        by_leaf.setdefault(knob.rpartition(".")[2], []).append(knob)
    siblings = [k.rpartition(".")[2] for k in knob_names() if k.rpartition(".")[0] == section]
    if leaf in by_leaf and leaf not in siblings:  # the right name in another section
        return by_leaf[leaf][:2]
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        return [f"{section}.{close[0]}" if section else close[0]]
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)
    return by_leaf[close[0]][:2] if close else []


def not_a_knob(key: str, value: Any = None) -> str:
    """The message for an unknown key: the nearest knob and the override that sets it."""
    near = nearest_knobs(key)
    shown = "..." if value is None or isinstance(value, (dict, list)) else value
    if near:
        fix = f"did you mean {' or '.join(near)}? (python run.py {near[0]}={shown})"
    else:
        section = key.rpartition(".")[0]
        siblings = [k for k in knob_names() if k.rpartition(".")[0] == section]
        if siblings:
            fix = f"the knobs of {section or 'the top level'} are: {', '.join(siblings)}"
        else:  # the section itself is unknown: the nearest one
            sections = sorted({k.rpartition(".")[0] for k in knob_names()} - {""} |
                              {k for k in knob_names() if is_knob(k + ".x")})  # dict knobs
            near_section = difflib.get_close_matches(section, sections, n=1, cutoff=0.6)
            fix = (f"{section} is no section either (the nearest: {near_section[0]})"
                   if near_section else f"{section} is no section of cnexp's config")
    return (f"{key} is not a knob: {fix}. cnexp/config.py declares every knob; a leading + "
            "adds none (docs/configuration.md)")


def unknown_knobs(cfg: DictConfig) -> list[str]:
    """A message for each key of the composed config that the schema does not declare
    (`hydra`, present in a plan's config, is Hydra's own)."""
    found = []

    def walk(node: DictConfig, schema: type, prefix: str) -> None:
        kinds = _sections(schema)
        for key in node.keys():
            if not prefix and key == "hydra":
                continue
            if key not in kinds:
                raw = OmegaConf.to_container(node, resolve=False).get(key)
                found.append(not_a_knob(f"{prefix}{key}", raw))
            elif dataclasses.is_dataclass(kinds[key]) and isinstance(node[key], DictConfig):
                walk(node[key], kinds[key], f"{prefix}{key}.")

    walk(cfg, TrainConfig, "")
    return found


def _is_group(key: str) -> bool:
    """A config group (conf/<group>/, or Hydra's own hydra/...), not a key."""
    return "/" in key or (CONF / key).is_dir()


def command_line_unknowns(overrides: list[str]) -> list[tuple[str, bool]]:
    """(message, added with +) for each override of a key the schema does not declare; an
    override Hydra cannot parse is left to Hydra's own message."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return []
    found = []
    for override in parsed:
        key = override.key_or_group
        if override.is_delete() or key.split(".")[0] == "hydra" or _is_group(key) or \
                is_knob(key):
            continue
        value = override.get_value_element_as_str() if not override.is_sweep_override() \
            else None
        found.append((not_a_knob(key, value), override.is_add() or override.is_force_add()))
    return found


def check_overrides(overrides: list[str]) -> None:
    """Refuse the first override of an unknown key (cnexp.plan: one refusal, exit code 2)."""
    for message, _ in command_line_unknowns(overrides):
        raise ConfigError(message)


def check_command_line(argv: list[str]) -> None:
    """run.py, before Hydra: an unknown key is named with its nearest knob. A `+`-added one
    stops here (exit code 2: Hydra would accept it); a plain one then meets Hydra's own refusal
    (exit code 1), whose `use +...` hint this message answers first."""
    # overrides are the arguments with "="; an option's value (--cfg job, -cn train) has none
    overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-")]
    found = command_line_unknowns(overrides)
    for message, _ in found:
        print(message, file=sys.stderr)
    if any(added for _, added in found):
        sys.exit(2)

"""Checkpoints a resume can trust: stable names, one write per save, and a resume that checks
what it loads.

`RunCheckpoints` is Lightning's `ModelCheckpoint` with five differences:

- **A constant state key.** Lightning's key holds the save interval, whose default here is
  `trainer.max_steps // 4`: a resume with a larger `max_steps` found no state, so it wrote
  `last-v1.ckpt` and left `last.ckpt` at the old step for the next resume to restart from.
  (A checkpoint from before this key is read under its old key.)
- **Paths re-rooted by name.** The state names files by absolute path, and Lightning drops it
  when the run directory has moved (a copy, a move, another mount): again `last-v1.ckpt`. Here
  every name is taken as a file of this run's `checkpoints/`.
- **Names a command line takes as typed**: a checkpoint's name is its step (`step-000012.ckpt`,
  `last.ckpt`), never `-v1`, whatever the directory held, and without Lightning's `=`
  (`epoch=0-step=12.ckpt`), which Hydra's override grammar refuses unquoted in
  `ckpt_path=<path>`. Older names still resume (by path, or as the newest of `checkpoints/`).
- **The run's identity in every checkpoint** (cnexp/run/identity.py), whoever saves it.
- **One write per save.** The periodic checkpoint is written once (SafeCheckpointIO: a temporary
  file, fsync, rename) and `last.ckpt` becomes a hard link to it, made under a temporary name and
  renamed over `last.ckpt`, so `last.ckpt` is a whole checkpoint at every instant and the previous
  one stays until the new one is complete. A file system without hard links gets a copy.

`resume_checkpoint` is what `ckpt_path=last|auto` resumes from: the newest checkpoint in
`checkpoints/` that reads as a Lightning checkpoint, `last.ckpt` first among equals; when that is
not `last.ckpt` (truncated, unreadable, missing or behind), a warning says which and why.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from cnexp.run.checkpoint_io import CheckpointError
from cnexp.run.context import is_rank_zero
from cnexp.run.identity import IDENTITY_KEY
from cnexp.run.record import LAST_CHECKPOINT
from cnexp.storage import storage_errors

log = logging.getLogger("cnexp")

STATE_KEY = "ModelCheckpoint"  # one key, whatever the interval or directory
PATH_FIELDS = ("best_model_path", "kth_best_model_path", "last_model_path")
STEP_NAME = "step-{step:06d}"  # step-000012.ckpt: no '=' for Hydra's grammar, sorts by step


class RunCheckpoints(ModelCheckpoint):
    """Every `every` steps into `dirpath`, with `last.ckpt` linked to the newest (see above)."""

    def __init__(self, dirpath: str | Path, every: int, identity: Optional[dict] = None):
        super().__init__(dirpath=dirpath, filename=STEP_NAME, auto_insert_metric_name=False,
                         every_n_train_steps=every, save_last="link",
                         enable_version_counter=False)
        self.identity = identity

    def on_save_checkpoint(self, trainer, module, checkpoint: dict[str, Any]) -> None:
        # every save (periodic, a signal's, the guard's) runs this hook: each carries the run
        if self.identity is not None:
            checkpoint[IDENTITY_KEY] = self.identity

    @property
    def state_key(self) -> str:
        return STATE_KEY

    def on_load_checkpoint(self, trainer, module, checkpoint: dict[str, Any]) -> None:
        # a checkpoint written before the constant key: its key held the interval
        states = checkpoint.get("callbacks") or {}
        if STATE_KEY not in states:
            old = [k for k in states if isinstance(k, str) and k.startswith(STATE_KEY + "{")]
            if len(old) == 1:
                states[STATE_KEY] = states[old[0]]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        here = str(self.dirpath)

        def local(path):  # a file of this run's checkpoints/, wherever the run lived
            return os.path.join(here, os.path.basename(path)) if path else path

        for field in PATH_FIELDS:
            if field in state:
                state[field] = local(state[field])
        state["best_k_models"] = {local(k): v for k, v in state.get("best_k_models", {}).items()}
        state["dirpath"] = here
        super().load_state_dict(state)

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            link_atomically(Path(filepath), Path(linkpath))
        trainer.strategy.barrier()


def link_atomically(source: Path, target: Path) -> None:
    """`target` becomes `source`'s bytes without writing them again: a hard link made under a
    temporary name and renamed over `target` (a copy where the file system has no hard links)."""
    tmp = target.with_name(target.name + ".tmp")
    with storage_errors(target, partial=tmp):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left by a process killed here
        try:
            os.link(source, tmp)
        except OSError:  # no hard links here (some FUSE and object-store mounts)
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(tmp, target)


# ---- what ckpt_path=last|auto resumes from ------------------------------------------------------
def load_mapped(path: str | Path) -> Any:
    """torch.load with the tensors memory-mapped (torch's legacy format: read)."""
    try:
        return torch.load(path, map_location="cpu", mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(path, map_location="cpu")  # torch's legacy (non-zip) format


def read_step(path: Path) -> tuple[Optional[int], str]:
    """(global_step, "") for a file that reads as a Lightning checkpoint, else (None, why). The
    tensors are memory-mapped, not read: the check costs the pickle, not gigabytes."""
    try:
        if path.stat().st_size == 0:
            return None, "it is empty"
        checkpoint = load_mapped(path)
    except FileNotFoundError:
        return None, "it is missing"
    except Exception as err:  # noqa: BLE001 - whatever torch.load says, the file is unusable
        first = (str(err).splitlines() or [""])[0].strip() or type(err).__name__
        return None, f"it is not a readable checkpoint ({first})"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or \
            not isinstance(checkpoint.get("global_step"), int):
        return None, "it is not a Lightning checkpoint (no state_dict or global_step)"
    return checkpoint["global_step"], ""


def resume_checkpoint(directory: Path) -> Optional[Path]:
    """The newest intact checkpoint in `directory` (last.ckpt first among equals), None when the
    directory holds no checkpoint; CheckpointError when it holds only broken ones."""
    last = directory / LAST_CHECKPOINT
    files = sorted(directory.glob("*.ckpt"), key=lambda p: (p != last, p.name))
    if not files:
        return None
    checked = {path: read_step(path) for path in files}
    intact = [(step, path) for path, (step, _) in checked.items() if step is not None]
    if not intact:
        listed = "; ".join(f"{p.name}: {why}" for p, (_, why) in checked.items())
        raise CheckpointError(
            f"no intact checkpoint to resume in {directory} ({listed}). Restore the run's "
            "checkpoints from a copy, resume from another with ckpt_path=<file>, or start the "
            "run again in a new directory (leave hydra.run.dir and ckpt_path out)")
    best_step = max(step for step, _ in intact)
    chosen = next(path for step, path in intact if step == best_step)  # last.ckpt sorts first
    if chosen != last and is_rank_zero():  # every DDP rank picks the same file; one says so
        step, why = checked.get(last, (None, "it is missing"))
        why = why or f"it holds step {step}"
        log.warning("%s: %s; resuming from %s (step %d), the newest intact checkpoint",
                    last, why, chosen.name, best_step)
    return chosen

"""Guards for long runs: checkpoint files; non-finite losses/gradients (finite.py), signals
(signals.py)."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cnexp.errors import CnexpError
from cnexp.fileio import AtomicFile
from cnexp.run.signals import RunStopped
from cnexp.storage import (StorageError, exception_chain, free_space, storage_failure,
                           what_failed)


class CheckpointError(CnexpError):
    pass


class CheckpointStorageError(CheckpointError, StorageError):
    """A checkpoint the disk had no room (quota, I/O) for; the previous one is intact."""


SHOWN_KEYS = 3  # differing state-dict keys named in a mismatch message


class SafeCheckpointIO(TorchCheckpointIO):
    """Checkpoint files that a full disk cannot destroy and a wrong model cannot load.

    Saving writes a temporary file beside the target, fsyncs it and renames it over the target
    (Lightning's own writer may stage in the system temp dir and copy across file systems): the
    previous checkpoint stays whole until the new one is complete. Loading into `module` checks
    the keys first: the module loads non-strictly (checkpoints hold only the trainable part), so
    a checkpoint of another architecture would otherwise be skipped in silence.
    """

    def __init__(self, module: L.LightningModule | None = None):
        super().__init__()
        self.module = module

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's way
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            with AtomicFile(path) as f:  # a partial file is removed: it would only hold the space
                torch.save(checkpoint, f)
        except BaseException as err:
            # a second Ctrl-C inside torch.save surfaces as torch's write error around it
            stop = next((e for e in exception_chain(err)
                         if isinstance(e, (RunStopped, KeyboardInterrupt))), None)
            if stop is not None:
                raise stop from None
            # a full disk: Python's OSError, or torch.save's RuntimeError around it
            cause = storage_failure(err) or (err if isinstance(err, OSError) else None)
            if cause is None:
                raise
            raise CheckpointStorageError(_save_failure(path, cause),
                                         getattr(cause, "errno", None)) from None

    def load_checkpoint(self, path, *args: Any, **kwargs: Any) -> dict:
        use = "use a .ckpt file from a run's checkpoints/ directory"
        try:
            checkpoint = super().load_checkpoint(path, *args, **kwargs)
        except FileNotFoundError:
            raise CheckpointError(f"ckpt_path '{path}' does not exist: {use}, or ckpt_path=last"
                                  ) from None
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"ckpt_path '{path}' is not a readable checkpoint ({why}): "
                                  f"{use}") from None
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise CheckpointError(f"ckpt_path '{path}' is not a Lightning checkpoint (no "
                                  f"state_dict): {use}")
        if self.module is not None:
            check_state_dict(path, checkpoint["state_dict"], saved_shapes(self.module))
        return checkpoint


def _save_failure(path: Path, err: BaseException) -> str:
    kept = sorted(str(p) for p in path.parent.glob("*.ckpt"))
    previous = (f"the previous checkpoint(s) are intact: {', '.join(kept)}" if kept
                else "no earlier checkpoint exists")
    return (f"could not save checkpoint {path}: {what_failed(err)}; {previous}; "
            f"{free_space(path)}. "
            "Free space (or set hydra.run.dir on a disk with room), then resume with "
            "ckpt_path=<a checkpoint above> (ckpt_path=last in the same run directory)")


def saved_shapes(module: L.LightningModule) -> dict[str, torch.Size]:
    """Key -> shape of what `module` writes into a checkpoint (its own on_save_checkpoint
    decides which keys: the trainable part)."""
    checkpoint = {"state_dict": module.state_dict()}  # detached references, no copy
    module.on_save_checkpoint(checkpoint)
    return {k: v.shape for k, v in checkpoint["state_dict"].items()}


def check_state_dict(path, state: dict, expected: dict[str, torch.Size]) -> None:
    """One CheckpointError naming (a few of) the missing, unexpected and reshaped keys."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shape = {k: tuple(getattr(state[k], "shape", ())) for k in expected.keys() & state.keys()}
    reshaped = [f"{k} {shape[k]} vs {tuple(expected[k])}" for k in sorted(shape)
                if shape[k] != tuple(expected[k])]
    parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:SHOWN_KEYS])})"
             for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                ("keys of another shape, checkpoint vs model", reshaped)) if keys]
    if parts:
        raise CheckpointError(
            f"ckpt_path '{path}' was saved by a different architecture: {'; '.join(parts)}. "
            "Resume with the settings that wrote it (base=, control.* as in that run's "
            "config.yaml), or start fresh without ckpt_path")

"""Guards for long runs: non-finite losses/gradients, checkpoint files (signals: signals.py)."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cnexp.errors import CnexpError

log = logging.getLogger("cnexp")


class NonFiniteError(CnexpError):
    pass


class CheckpointError(CnexpError):
    pass


SHOWN_KEYS = 3  # differing state-dict keys named in a mismatch message


class NonFiniteGuard(L.Callback):
    """A NaN/inf loss or gradient stops the run (`stop`) or skips that optimizer step (`skip`);
    finite gradients are clipped to `clip_norm` (trainer.gradient_clip_val) with the same norm.

    Stopping raises before the optimizer step, so the weights and the last checkpoint on disk are
    the last good ones. One host sync per step (a single foreach norm over all gradients), which
    Lightning's own clipping would take a second time: train.py leaves the clipping to the guard.
    """

    def __init__(self, action: str = "stop", checkpoint_dir: Path | None = None,
                 clip_norm: float | None = None):
        self.action = action
        self.checkpoint_dir = checkpoint_dir
        self.clip_norm = clip_norm
        self.skipped = 0

    def state_dict(self) -> dict:  # a resumed run keeps counting
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))

    def _fail(self, trainer, what: str) -> None:
        where = f"; the last good checkpoint is in {self.checkpoint_dir}" if self.checkpoint_dir else ""
        raise NonFiniteError(
            f"non-finite {what} at step {trainer.global_step}{where}. Lower optim.lr, check the "
            "data, or set trainer.on_nonfinite=skip to skip such steps")

    def on_before_backward(self, trainer, module, loss: torch.Tensor) -> None:
        if self.action == "stop" and not torch.isfinite(loss):
            self._fail(trainer, f"loss ({loss.item()})")

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.grad is not None]
        if not params:
            return
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # inf/nan anywhere shows
        if torch.isfinite(norm):
            if self.clip_norm:  # as clip_grad_norm_ would, without taking the norm again
                torch.nn.utils.clip_grads_with_norm_(params, self.clip_norm, norm)
            return
        if self.action == "stop":
            self._fail(trainer, "gradient")
        for p in params:  # a parameter without grad is left untouched
            p.grad = None
        self.skipped += 1
        log.warning("skipped step %d: non-finite gradient (%d skipped so far)",
                    trainer.global_step, self.skipped)
        module.log("train/skipped_steps", float(self.skipped))


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
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # a partial file would only hold the space
            raise CheckpointError(_save_failure(path, err)) from None

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


def _save_failure(path: Path, err: OSError) -> str:
    what = "disk full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "write failed"
    kept = sorted(str(p) for p in path.parent.glob("*.ckpt"))
    previous = (f"the previous checkpoint(s) are intact: {', '.join(kept)}" if kept
                else "no earlier checkpoint exists")
    return (f"could not save checkpoint {path}: {what} ({err.strerror or err}); {previous}. "
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

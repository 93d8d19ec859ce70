"""Guards for long runs: non-finite losses/gradients, SIGTERM pre-emption."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cnexp.errors import CnexpError

log = logging.getLogger("cnexp")


class NonFiniteError(CnexpError):
    pass


class NonFiniteGuard(L.Callback):
    """A NaN/inf loss or gradient stops the run (`stop`) or skips that optimizer step (`skip`).

    Stopping raises before the optimizer step, so the weights and the last checkpoint on disk are
    the last good ones. One host sync per step (a single reduction over all gradients).
    """

    def __init__(self, action: str = "stop", checkpoint_dir: Path | None = None):
        if action not in ("stop", "skip"):
            raise CnexpError(f"trainer.on_nonfinite={action!r}: use 'stop' or 'skip'")
        self.action = action
        self.checkpoint_dir = checkpoint_dir
        self.skipped = 0

    def _fail(self, trainer, what: str) -> None:
        where = f"; the last good checkpoint is in {self.checkpoint_dir}" if self.checkpoint_dir else ""
        raise NonFiniteError(
            f"non-finite {what} at step {trainer.global_step}{where}. Lower optim.lr, check the "
            "data, or set trainer.on_nonfinite=skip to skip such steps")

    def on_before_backward(self, trainer, module, loss: torch.Tensor) -> None:
        if self.action == "stop" and not torch.isfinite(loss):
            self._fail(trainer, f"loss ({loss.item()})")

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        if not grads or torch.isfinite(torch.stack([g.float().sum() for g in grads]).sum()):
            return
        if self.action == "stop":
            self._fail(trainer, "gradient")
        for group in optimizer.param_groups:  # a parameter without grad is left untouched
            for p in group["params"]:
                p.grad = None
        self.skipped += 1
        log.warning("skipped step %d: non-finite gradient (%d skipped so far)",
                    trainer.global_step, self.skipped)
        module.log("train/skipped_steps", float(self.skipped))


class SaveOnSigterm(L.Callback):
    """SLURM pre-emption sends SIGTERM: Lightning finishes the step, we save `last.ckpt`,
    and `ckpt_path=last` resumes from exactly there."""

    def __init__(self, checkpoint_dir: Path):
        self.path = Path(checkpoint_dir) / "last.ckpt"

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)
            log.warning("SIGTERM at step %d: saved %s", trainer.global_step, self.path)

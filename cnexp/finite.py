"""The non-finite guard: a NaN/inf loss or gradient stops the run (`stop`) or skips the step
(`skip`), without making the host wait for the device in every step.

Each step folds isfinite(loss) and isfinite(gradient norm) into flags that stay on the device. A
bad step is dropped on the device too: fused AdamW takes a `found_inf` tensor (the input torch's
GradScaler drives) and, where it is 1, leaves weights, moments and step count untouched. The host
reads the flags at the logging cadence (every trainer.log_every_n_steps steps and the last step,
cnexp.cadence), before each checkpoint is written, and when training ends:
- stop: from the first bad step on every update is dropped, so the weights stay those before
  it; the next reading raises NonFiniteError naming that step (it comes up to
  log_every_n_steps - 1 steps later). No checkpoint is written after a bad step.
- skip: each bad step alone is dropped and counted on the device; the count and a warning come at
  the next reading (train/skipped_steps is logged then).
When training ends (at its last step, before that step's checkpoint and the final evaluation, and
again at train end) a run that learned nothing fails with NonFiniteError, so it is neither
exported nor recorded as finished: every step skipped, or a trainable weight that is NaN/inf (a
finite step with a huge learning rate gets there without a non-finite gradient).
An optimizer without `found_inf` (optim.fused=false, optim.eight_bit) cannot drop a step on the
device: with it the guard reads the flag every step (one host sync) and drops a bad step by
clearing its gradients, as it always did.

Under a GradScaler (trainer.precision=16-mixed) overflowing gradients are routine: the scaler
drops those steps itself and lowers its scale, so the guard leaves gradients to it and checks the
loss only. Lightning leaves the unscaling of a fused optimizer's gradients to its step; the guard
unscales them first (scaler.unscale_, which the scaler's step honours), so it clips true gradients.
"""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

from cnexp.cadence import host_reads_at
from cnexp.errors import CnexpError

log = logging.getLogger("cnexp")


class NonFiniteError(CnexpError):
    pass


def grad_scaler(trainer) -> torch.amp.GradScaler | None:
    """The precision plugin's GradScaler (16-mixed), if one is active."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


class NonFiniteGuard(L.Callback):
    """Stops on or skips non-finite steps (module docstring); clips finite gradients to
    `clip_norm` (trainer.gradient_clip_val) with the norm it takes anyway (train.py leaves
    clipping to the guard, so the norm is taken once per step)."""

    def __init__(self, action: str = "stop", checkpoint_dir: Path | None = None,
                 clip_norm: float | None = None):
        self.action = action
        self.checkpoint_dir = checkpoint_dir
        self.clip_norm = clip_norm
        self._skipped_read = 0  # skip: steps counted at earlier readings (and earlier segments)
        self._loss_ok = None  # this step's losses (all micro-batches) finite: bool tensor
        self._good = None  # stop: no bad step so far
        self._bad_step = None  # stop: the first bad step (-1: none)
        self._bad_loss = None  # stop: whether that step's loss was non-finite (else a gradient)
        self._skipped_new = None  # skip: bad steps since the last reading
        self._skipped_last = None  # skip: the last of them

    @property
    def skipped(self) -> int:
        """Steps skipped so far (reads the device: for readings, checkpoints and tests)."""
        new = int(self._skipped_new) if self._skipped_new is not None else 0
        return self._skipped_read + new

    def state_dict(self) -> dict:  # a resumed run keeps counting
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self._skipped_read = int(state.get("skipped", 0))
        self._skipped_new = None

    # ---- every step: device-side only ---------------------------------------------------------
    def on_before_backward(self, trainer, module, loss: torch.Tensor) -> None:
        if self.action != "stop":
            return  # skip: a non-finite loss shows in the gradient, which decides
        finite = torch.isfinite(loss.detach()).all()
        self._loss_ok = finite if self._loss_ok is None else self._loss_ok & finite

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        loss_ok, self._loss_ok = self._loss_ok, None
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.grad is not None]
        scaler = grad_scaler(trainer)
        on_device = getattr(optimizer, "_step_supports_amp_scaling", False)  # takes found_inf
        if not params:
            if scaler is None and on_device and hasattr(optimizer, "found_inf"):
                del optimizer.found_inf  # nothing to step: no verdict of an earlier step lingers
            return
        if scaler is not None and on_device:
            scaler.unscale_(optimizer)  # Lightning leaves it to the fused step: clip true grads
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # inf/nan anywhere shows
        if self.clip_norm:  # as clip_grad_norm_ would, without taking the norm again
            torch.nn.utils.clip_grads_with_norm_(params, self.clip_norm, norm)
        bad_loss = ~loss_ok if loss_ok is not None else torch.zeros_like(norm, dtype=torch.bool)
        # under a scaler an overflowing gradient is the scaler's to drop (and lower its scale)
        bad = bad_loss if scaler is not None else bad_loss | ~torch.isfinite(norm)
        if scaler is None and not on_device:  # no device-side drop: decide now (a host sync)
            if bool(bad):
                self._drop_now(trainer, module, params, bool(bad_loss))
            return
        drop = self._record(bad, bad_loss, trainer.global_step)
        if scaler is None:  # the fused step reads it (under a scaler, the scaler sets its own)
            optimizer.found_inf = drop.float()

    def _record(self, bad: torch.Tensor, bad_loss: torch.Tensor, step: int) -> torch.Tensor:
        """Fold this step's verdict into the device flags; returns whether to drop the update."""
        if self.action == "stop":
            if self._good is None:
                self._good = torch.ones_like(bad)
                self._bad_step = torch.full_like(bad, -1, dtype=torch.long)
                self._bad_loss = torch.zeros_like(bad)
            first = bad & self._good
            self._bad_step = torch.where(first, step, self._bad_step)
            self._bad_loss = torch.where(first, bad_loss, self._bad_loss)
            self._good = self._good & ~bad
            return ~self._good  # this step and every later one: the weights stay the last good
        if self._skipped_new is None:
            self._skipped_new = torch.zeros_like(bad, dtype=torch.long)
            self._skipped_last = torch.full_like(bad, -1, dtype=torch.long)
        self._skipped_new = self._skipped_new + bad
        self._skipped_last = torch.where(bad, step, self._skipped_last)
        return bad

    def _drop_now(self, trainer, module, params: list, loss: bool) -> None:
        """The per-step path (optimizers without found_inf): stop, or clear the gradients."""
        if self.action == "stop":
            self._fail(trainer, "loss" if loss else "gradient", trainer.global_step)
        for p in params:  # a parameter without grad is left untouched by the optimizer
            p.grad = None
        self._skipped_read += 1
        log.warning("skipped step %d: non-finite gradient (%d skipped so far)",
                    trainer.global_step, self._skipped_read)
        module.log("train/skipped_steps", float(self._skipped_read))

    # ---- readings: the logging cadence, checkpoints, the end ----------------------------------
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if host_reads_at(trainer, trainer.global_step):
            self._read(trainer, module, can_log=True)
        if trainer.global_step >= trainer.max_steps > 0:  # the last step: before its checkpoint
            self.check_learned(trainer, module)

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        self._read(trainer, module)  # a checkpoint never follows an unnoticed bad step

    def on_train_end(self, trainer, module) -> None:
        self._read(trainer, module)
        self.check_learned(trainer, module)  # also ends that came without a last step

    def check_learned(self, trainer, module) -> None:
        """NonFiniteError when the run learned nothing: every step skipped (over the whole run,
        resumed segments included), or a trainable weight that is not finite. Reads the device
        once; called only at the end of training."""
        steps = trainer.global_step
        if self.action == "skip" and steps > 0 and self.skipped >= steps:
            raise NonFiniteError(
                f"all {steps} training steps were skipped (trainer.on_nonfinite=skip: a non-finite "
                "loss or gradient in each), so the run learned nothing and nothing is exported. "
                "Lower optim.lr, check the data, or run with trainer.on_nonfinite=stop to stop at "
                "the first such step")
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        if not named:
            return
        finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named])
        if bool(finite.all()):  # the host sync, once per run
            return
        bad = [named[i][0] for i in (~finite).nonzero().flatten().tolist()]
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise NonFiniteError(
            f"after step {steps} the trained weights hold NaN/inf values ({bad[0]}{more}), so "
            "nothing is exported. Lower optim.lr and check the data")

    def _read(self, trainer, module, can_log: bool = False) -> None:
        if self.action == "stop":
            if self._good is None:
                return
            bad = (~self._good).float()
            if getattr(trainer, "world_size", 1) > 1:  # a rank's own loss may be the only bad one
                bad = trainer.strategy.reduce(bad, reduce_op="sum")
            if bool(bad > 0):  # the host sync, once per reading
                step = int(self._bad_step)
                self._fail(trainer, "loss" if bool(self._bad_loss) else "gradient", step)
            return
        if self._skipped_new is None:
            return
        new = int(self._skipped_new)
        if not new:
            return
        self._skipped_read += new
        log.warning("skipped %d step(s) with a non-finite gradient, the last at step %d "
                    "(%d skipped so far)", new, int(self._skipped_last), self._skipped_read)
        self._skipped_new = torch.zeros_like(self._skipped_new)
        if can_log:
            module.log("train/skipped_steps", float(self._skipped_read))

    def _fail(self, trainer, what: str, step: int) -> None:
        where = f"; the last good checkpoint is in {self.checkpoint_dir}" if self.checkpoint_dir \
            else ""
        at = f"at step {step}" if step >= 0 else "on another rank"
        raise NonFiniteError(
            f"non-finite {what} {at}{where} (no update from that step on was applied). Lower "
            "optim.lr, check the data, or set trainer.on_nonfinite=skip to skip such steps")

"""When the host reads what the device computed: every trainer.log_every_n_steps steps.

A training step that reads a device value (`.item()`, `.tolist()`, `if tensor:`) makes the CPU
wait for the GPU to finish everything queued, so the CPU can no longer run ahead and launch the
next step's work while the GPU computes. Whatever the host must know (the progress bar's loss,
the non-finite guard's verdict, DDP's agreement to stop on a signal) is read at the steps that log
anyway, and at the last step.
"""
from __future__ import annotations


def host_reads_at(trainer, steps_done: int) -> bool:
    """True when `steps_done` optimizer steps are a reading point: a multiple of
    trainer.log_every_n_steps, or the run's last step. Pass trainer.global_step after a step
    (on_train_batch_end) and trainer.global_step + 1 before it (training_step)."""
    every = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
    last = getattr(trainer, "max_steps", -1)
    return steps_done % every == 0 or 0 < last <= steps_done

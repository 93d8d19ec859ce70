"""Pre-emption and Ctrl-C: finish the step, save `last.ckpt`, say what happened, exit non-zero.

SIGTERM (SLURM pre-emption, `scancel`), SIGUSR1 and SIGUSR2 (the warning signals SLURM sends
before a time limit with `--signal`, submitit's default being USR2) mean *pre-empted*; the first
SIGINT (Ctrl-C) means *interrupted*; a second SIGINT stops at once. During training the signal only
sets a flag: the step in flight finishes (its evaluation too), every rank agrees to stop at that
same step, `checkpoints/last.ckpt` is written, and `RunStopped` ends the fit. One process stops
after the step in flight; under DDP the ranks agree (one all-reduce) only at the logging cadence
(trainer.log_every_n_steps, cnexp.cadence), so a signal stops the run at the next log step: the
other steps run no collective and never wait on the host. Before the first step
(loading, the step-0 evaluation, the frozen-encoder cache fill) there is nothing to save, so the
signal stops the run straight away.

cnexp owns the save; whoever asked for the signal owns the requeue: a handler installed before
cnexp's (submitit's, in a SLURM job) is called after the save, so it can requeue the job. Lightning's
own SIGTERM handling is replaced for the duration of training, so the two never both act.
Exit codes (run.py): 143 pre-empted, 130 interrupted, as a shell reports a process killed by
SIGTERM or SIGINT.
"""
from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Optional

import lightning as L

from cnexp.cadence import host_reads_at
from cnexp.run.record import LAST_CHECKPOINT

log = logging.getLogger("cnexp")

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
EXIT_CODES = {"preempted": 143, "interrupted": 130}


class RunStopped(Exception):
    """The run stopped on a signal; `checkpoint` is where it can resume from (None: nowhere new)."""

    def __init__(self, reason: str, signal_name: str, step: int = 0,
                 checkpoint: Optional[Path] = None):
        self.reason, self.signal_name, self.step, self.checkpoint = reason, signal_name, step, \
            checkpoint
        saved = f"saved {checkpoint}" if checkpoint else "nothing new saved"
        super().__init__(f"{reason} by {signal_name} at step {step} ({saved})")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.reason]


class StopSignals:
    """The process's handlers for the stop signals (install once, in run.py)."""

    def __init__(self):
        self.received: Optional[int] = None
        # setup: stop at once (nothing to save); training: StopAtStepEnd acts at the end of the
        # step; finishing: the final evaluation and the record complete, the signal is noted;
        # stopping: saved, exiting (a late signal must not turn a clean stop into a crash)
        self.phase = "setup"
        self.previous: dict[int, object] = {}

    def install(self) -> "StopSignals":
        for signum in (*PREEMPT_SIGNALS, signal.SIGINT):
            self.previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @property
    def reason(self) -> str:
        return "interrupted" if self.received == signal.SIGINT else "preempted"

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.phase == "stopping":  # the save is done and the process is on its way out
            log.warning("%s received while stopping: already exiting", name)
            return
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            self.phase = "stopping"
            raise RunStopped("interrupted", "a second SIGINT")  # the user insists: stop now
        if self.received is None:
            self.received = signum
        if self.phase == "setup":
            self.phase = "stopping"
            raise RunStopped(self.reason, name)
        if self.phase == "finishing":
            log.warning("%s received after the last step: finishing the record first", name)
            return
        log.warning("%s received: finishing this step, then saving last.ckpt and stopping%s",
                    name, " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")

    def chain(self) -> None:
        """Call the handler that was there before cnexp's for the received signal (submitit's
        requeue); default and ignore dispositions are left alone."""
        handler = self.previous.get(self.received)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(self.received, None)


class StopAtStepEnd(L.Callback):
    """Acts on StopSignals' flag at the end of a step: every rank stops at the same step."""

    def __init__(self, signals: StopSignals, checkpoint_dir: Path):
        self.signals = signals
        self.path = Path(checkpoint_dir) / LAST_CHECKPOINT

    def on_train_start(self, trainer, module) -> None:
        self.signals.install()  # Lightning registered its SIGTERM handler since: ours again

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        # only now is there a step to finish: a signal during what comes before it (the step-0
        # evaluation, the frozen-encoder cache fill, which can take minutes) stops at once
        if self.signals.phase == "setup":
            self.signals.phase = "training"

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= trainer.max_steps > 0:
            self.signals.phase = "finishing"  # the last step: the run completes its record
            return
        stop = self.signals.received is not None
        if trainer.world_size > 1:  # a rank that got no signal must stop at the same step
            if not host_reads_at(trainer, trainer.global_step):
                return  # agreed on at the next log step: no collective, no host sync here
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        trainer.save_checkpoint(self.path)
        self.signals.phase = "stopping"
        name = signal.Signals(self.signals.received).name if self.signals.received else "a peer"
        raise RunStopped(self.signals.reason, name, trainer.global_step, self.path)

    def on_train_end(self, trainer, module) -> None:
        self.signals.phase = "finishing"  # the final evaluation and export are not interrupted

"""One training progress bar counted in optimizer steps: step/max_steps, steps/s, ETA, loss.

Lightning's bars count batches per epoch, which in a max_steps run gives no total, no rate and
no ETA. This bar follows trainer.global_step over trainer.max_steps across epochs, starts at the
resumed step when a run resumes, and leaves evaluation out of its clock: evaluation runs inside
training hooks (step 0, every eval.every_n_steps, the end), so counted in, it would stall the rate
and swing the ETA after every evaluation. The clock (elapsed, steps/s, ETA) therefore counts
training only; the postfix shows this process's evaluation seconds (a resumed run's earlier
segments left out, as they are from `elapsed`), so this process's wall time = elapsed + eval.
The ETA does not include evaluations still to come. The counts and the clock move every step;
the loss is read from the device only every trainer.log_every_n_steps steps (cnexp.cadence), so
the bar never makes the host wait for the device in the other steps.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from cnexp.cadence import host_reads_at
from cnexp.progress_plain import PlainLines, is_terminal

LOSS = "train/loss"  # logged without prog_bar (module.py): read here, at the logging cadence


class StepProgressBar(TQDMProgressBar):
    BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def __init__(self, excluded_seconds: Optional[Callable[[], float]] = None,
                 plain: Optional[bool] = None, **kwargs) -> None:
        """excluded_seconds: running total of wall seconds spent outside training (evaluation's
        `seconds`); each increase moves the bar's clock forward, as tqdm's own unpause does.
        plain: a line every few percent or minutes instead of a redrawn bar (PlainLines); None:
        when stdout is not a terminal (a batch job's log)."""
        super().__init__(**kwargs)
        self.excluded_seconds = excluded_seconds
        self.plain = plain
        self._excluded_seen = 0.0
        self._excluded_carried = 0.0  # a resumed run's earlier segments' (from its checkpoint)

    def init_train_tqdm(self) -> Tqdm:
        # a resumed run restores global_step before on_train_start: the bar starts there, and
        # its rate, (n - initial) / elapsed, counts only the steps this process trains
        step = self.trainer.global_step
        plain = not is_terminal(sys.stdout) if self.plain is None else self.plain
        bar = PlainLines if plain else Tqdm
        return bar(desc="train", total=self.trainer.max_steps, initial=step,
                    position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stdout, unit="step", smoothing=0,
                    bar_format=self.BAR_FORMAT)

    def on_train_start(self, trainer, module) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self._excluded_seen = self.excluded_seconds() if self.excluded_seconds else 0.0
        # a fresh run evaluated step 0 just now, in this process; a resumed run evaluates nothing
        # before its first step, so what it holds now came with its checkpoint
        self._excluded_carried = self._excluded_seen if trainer.global_step > 0 else 0.0

    def on_train_epoch_start(self, trainer, *_) -> None:
        pass  # one bar for the whole run: the parent would reset it every epoch

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar.disable or trainer.global_step == bar.n:  # mid-accumulation: no new step
            return
        self._exclude(bar)
        bar.n = trainer.global_step
        if host_reads_at(trainer, bar.n):  # the loss (a device value) only at log steps
            bar.set_postfix(self.get_metrics(trainer, module), refresh=False)
        if bar.n % self.refresh_rate == 0 or bar.n == bar.total:
            bar.refresh()

    def on_train_epoch_end(self, trainer, module) -> None:
        pass  # the postfix is current at every log step

    def on_train_end(self, trainer, module) -> None:
        bar = self.train_progress_bar
        if not bar.disable:
            self._exclude(bar)
            bar.set_postfix(self.get_metrics(trainer, module), refresh=False)
        bar.close()

    def get_metrics(self, trainer, module) -> dict:
        """The prog_bar metrics and train/loss by their last name (train/loss -> loss), plus
        evaluation time. Reads the loss from the device: call it at the logging cadence."""
        shown = dict(super().get_metrics(trainer, module))
        loss = trainer.callback_metrics.get(LOSS)
        if LOSS not in shown and loss is not None:
            shown[LOSS] = float(loss)
        metrics = {k.rsplit("/", 1)[-1]: v for k, v in shown.items() if k != "v_num"}
        evaluated = self._excluded_seen - self._excluded_carried  # by this process, as elapsed
        if evaluated > 0:  # nothing to say while evaluation is off
            metrics["eval"] = f"{evaluated:.0f}s"
        return metrics

    def _exclude(self, bar: Tqdm) -> None:
        """Move the bar's start forward by the seconds spent outside training since last time."""
        if self.excluded_seconds is None:
            return
        total = self.excluded_seconds()
        bar.start_t += total - self._excluded_seen
        self._excluded_seen = total

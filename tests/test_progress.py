"""The step progress bar: step/max_steps across epochs, steps/s and ETA without evaluation time,
loss in the postfix, and a resumed run starting at its step (real Lightning runs, tiny model)."""
import io
import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from cnexp.progress import StepProgressBar
from cnexp.progress_plain import PlainLines


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):  # 4 batches per epoch: 10 steps span 3 epochs
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(8, 4, generator=g),
                                        torch.randn(8, 1, generator=g)), batch_size=2)


class SlowEvaluation(L.Callback):
    """Stands in for the evaluation callback: spends wall time in training hooks and reports
    exactly `pause` seconds each time (a fixed count, so the test asserts no measured time)."""

    def __init__(self, pause: float):
        self.pause, self.seconds = pause, 0.0

    def _evaluate(self):
        time.sleep(self.pause)  # real time passes, as in an evaluation: the clock stays positive
        self.seconds += self.pause

    def on_train_start(self, trainer, module):
        self._evaluate()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == 5:
            self._evaluate()


def fit(tmp_path, max_steps, bar, callbacks=(), ckpt_path=None, **kwargs):
    trainer = L.Trainer(max_steps=max_steps, logger=False, default_root_dir=tmp_path,
                        callbacks=[*callbacks, bar], enable_model_summary=False, **kwargs)
    trainer.fit(Regression(), ckpt_path=ckpt_path)
    return trainer


def test_bar_counts_steps_over_max_steps_with_the_loss(tmp_path, capsys):
    bar = StepProgressBar(plain=False)  # the terminal's bar (capsys is not a terminal)
    trainer = fit(tmp_path, 10, bar, enable_checkpointing=False)
    tq = bar.train_progress_bar
    assert trainer.current_epoch >= 2  # several epochs, one bar: not reset per epoch
    assert (tq.n, tq.total, tq.initial) == (10, 10, 0)
    loss = float(trainer.callback_metrics["train/loss"])
    assert tq.postfix == f"loss={Tqdm.format_num(loss)}"  # by its last name, no v_num
    line = capsys.readouterr().out.split("\r")[-1]
    assert line.startswith("train 10/10 |") and "step/s" in line and "loss=" in line


class ClockRecordingBar(StepProgressBar):
    def on_train_start(self, trainer, module) -> None:
        super().on_train_start(trainer, module)
        self.started_at = self.train_progress_bar.start_t


def test_evaluation_time_is_left_out_of_the_rate_and_shown_apart(tmp_path, capsys):
    evaluation = SlowEvaluation(pause=0.6)
    bar = ClockRecordingBar(lambda: evaluation.seconds, plain=False)
    fit(tmp_path, 10, bar, callbacks=[evaluation], enable_checkpointing=False)
    assert evaluation.seconds == pytest.approx(1.2)  # at train start and at step 5
    # the bar's clock starts after the first evaluation and skips the second: its start moved
    # forward by exactly the 0.6 s evaluation reported while the bar ran
    moved = bar.train_progress_bar.start_t - bar.started_at
    assert moved == pytest.approx(0.6)
    assert bar.train_progress_bar.postfix.endswith(", eval=1s")
    out = capsys.readouterr().out
    assert "/?" not in out and out.split("\r")[-1].endswith("eval=1s]")


def test_resumed_run_starts_the_bar_at_its_step(tmp_path):
    first = fit(tmp_path, 4, StepProgressBar())
    ckpt = first.checkpoint_callback.best_model_path
    assert ckpt
    bar = StepProgressBar()
    fit(tmp_path, 10, bar, ckpt_path=ckpt)
    tq = bar.train_progress_bar
    assert (tq.initial, tq.n, tq.total) == (4, 10, 10)
    # the rate shown counts the 6 steps this process trained, not the 4 restored: over 3 s of
    # the bar's clock, 2 steps/s (10 / 3 = 3.33 if the bar had started at 0)
    shown = Tqdm.format_meter(**{**tq.format_dict, "elapsed": 3.0})
    assert "2.00step/s" in shown, shown


def test_without_a_terminal_the_bar_writes_a_plain_line_every_5_percent(tmp_path, capsys):
    # capsys's stdout is not a terminal, as a SLURM .out file is not: plain mode by itself
    bar = StepProgressBar()
    trainer = fit(tmp_path, 40, bar, enable_checkpointing=False, log_every_n_steps=1)
    assert isinstance(bar.train_progress_bar, PlainLines)
    out = capsys.readouterr().out
    assert "\r" not in out  # not one carriage-return update per step
    lines = [line for line in out.splitlines() if line.startswith("train ")]
    steps = [int(line.split()[1].split("/")[0]) for line in lines]
    # the start, then every 5 % (2 of 40 steps); the last step may repeat with its final loss
    assert sorted(set(steps)) == list(range(0, 41, 2)) and len(lines) <= 22, lines
    loss = float(trainer.callback_metrics["train/loss"])
    last = lines[-1]
    assert last.startswith("train 40/40 (100%) [") and f"loss={Tqdm.format_num(loss)}" in last
    assert "step/s" in lines[10] and "<" in lines[10]  # the same figures: rate and ETA


def test_plain_lines_also_come_every_few_minutes_on_a_long_run():
    clock, out = [0.0], io.StringIO()
    bar = PlainLines(desc="train", total=100_000, initial=0, out=out, clock=lambda: clock[0],
                     every_s=300, unit="step", smoothing=0)
    for step in range(1, 101):  # 0.1 % of the run: no 5 % mark crossed
        clock[0] = step * 10.0  # 10 s per step
        bar.n = step
        bar.refresh()
    bar.close()
    steps = [int(line.split()[1].split("/")[0]) for line in out.getvalue().splitlines()]
    assert steps == [0, 30, 60, 90, 100]  # every 300 s, then the last figures at close

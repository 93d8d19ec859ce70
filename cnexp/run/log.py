"""The part of a run's record that lives in its checkpoints, so a resume continues it.

`RunLog` keeps the training loss at every `trainer.log_every_n_steps`, the fit time of earlier
segments, the steps a run was resumed from and where a warm start took its weights from; Lightning
stores its `state_dict` in every checkpoint (`state_problem` says when one is not that shape:
cnexp/run/identity.py refuses such a resume). Together with the evaluation history
(EvaluationCallback's state) it is the whole record: a run killed after a checkpoint and
resumed from it writes the same metrics.json and csv/metrics.csv as one that never stopped
(timings aside). The CSV is rewritten whole from the record (at each evaluation, each checkpoint
and the end), never appended to, so rows logged after the last checkpoint of a killed run cannot
appear twice.
"""
from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from typing import Callable

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from cnexp.fileio import atomic_write
from cnexp.storage import storage_failure

log = logging.getLogger("cnexp")

LOSS = "train/loss"


class RunLog(L.Callback):
    def __init__(self, log_every_n_steps: int, csv_path: Path | None,
                 eval_history: Callable[[], list[dict]] = list):
        self.every = max(1, log_every_n_steps)
        self.csv_path = csv_path
        self.eval_history = eval_history
        self.losses: list[dict] = []  # [{"step": s, "train/loss": v}]; s = steps done
        self.resumed_at: list[int] = []
        self.warm_start: dict | None = None  # the checkpoint a warm start took its weights from
        self.earlier_seconds = 0.0  # fit time of the segments before this process
        self._segment_start: float | None = None

    @property
    def fit_seconds(self) -> float:
        now = time.perf_counter()
        return self.earlier_seconds + (now - self._segment_start if self._segment_start else 0.0)

    # ---- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "resumed_at": list(self.resumed_at),
                "fit_seconds": self.fit_seconds, "warm_start": self.warm_start}

    def load_state_dict(self, state: dict) -> None:
        self.losses = list(state["losses"])
        self.resumed_at = list(state["resumed_at"])
        self.earlier_seconds = float(state["fit_seconds"])
        self.warm_start = state.get("warm_start")  # absent before warm starts existed

    @staticmethod
    def state_problem(state) -> str | None:
        """What makes `state` (from a checkpoint; None: none saved) other than state_dict's
        shape, or None: a resume would otherwise mix its rows with renamed ones."""
        if state is None:
            return None
        missing = [k for k in ("losses", "resumed_at", "fit_seconds") if k not in state]
        if missing:
            return f"state has no '{missing[0]}' (it has {', '.join(map(str, state))})"
        rows = state["losses"] if isinstance(state["losses"], list) else [None]
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or set(row) != {"step", LOSS}:
                fields = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
                return f"loss row {i} has fields {fields} (step, {LOSS} expected)"
        return None

    # ---- hooks --------------------------------------------------------------------------------
    def on_fit_start(self, trainer, module) -> None:
        # before any on_train_start: the step-0 evaluation (an earlier callback's) is fit time
        # too, as evaluation time counts it, so evaluation's share of the fit stays below 100 %
        self._segment_start = time.perf_counter()

    def on_train_start(self, trainer, module) -> None:
        if self._segment_start is None:  # outside trainer.fit (tests call the hooks directly)
            self._segment_start = time.perf_counter()
        if trainer.global_step > 0:
            self.resumed_at.append(trainer.global_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every and step < trainer.max_steps:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and (not self.losses or self.losses[-1]["step"] != step):
            if trainer.world_size > 1:  # each rank holds its share's loss: the global batch's
                loss = trainer.strategy.reduce(loss.detach(), reduce_op="mean")  # (all ranks)
            self.losses.append({"step": step, LOSS: float(loss)})  # one host sync per log step
        history = self.eval_history()
        if history and history[-1]["step"] == step:  # an evaluation just ran: show it
            self.write_csv()

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        self.write_csv()

    def on_train_end(self, trainer, module) -> None:
        self.earlier_seconds, self._segment_start = self.fit_seconds, None
        self.write_csv()

    def on_exception(self, trainer, module, exception) -> None:
        # best effort: a second failure here would bury the first (on a full disk it is the same)
        try:
            self.write_csv()
        except OSError as err:
            if storage_failure(exception) is None:
                log.warning("could not write %s: %s", self.csv_path, err)

    # ---- the CSV ------------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """Loss and evaluation rows merged by step (one row per step)."""
        by_step: dict[int, dict] = {}
        for row in [*self.losses, *self.eval_history()]:
            by_step.setdefault(row["step"], {"step": row["step"]}).update(row)
        return [by_step[s] for s in sorted(by_step)]

    @rank_zero_only
    def write_csv(self) -> None:
        if self.csv_path is None:
            return
        rows = self.rows()
        columns = ["step", *sorted({k for r in rows for k in r} - {"step"})]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.csv_path, text.getvalue())

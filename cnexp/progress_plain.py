"""The step bar for a log file: plain lines instead of carriage returns.

Without a terminal (a SLURM `.out` file, a pipe), tqdm's carriage-return updates pile up as one
unreadable line of thousands of updates. `PlainLines` keeps the bar's clock and figures but,
instead of redrawing, writes one line every `every_percent` % of the run or every `every_s`
seconds, whichever comes first (plus the first and the last), e.g.
    train 500/1000 (50%) [06:40<06:40, 1.25step/s, loss=0.0812, eval=31s]
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

LINE_FORMAT = ("{desc} {n_fmt}/{total_fmt} ({percentage:.0f}%) "
               "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")  # the bar's figures, no bar


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class _Nowhere:
    """Where tqdm's own drawing goes: PlainLines writes its lines itself."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class PlainLines(Tqdm):
    """A Tqdm (same clock, rate, ETA and postfix) that writes lines at a cadence to `out`."""

    def __init__(self, *args, out: Optional[TextIO] = None, every_percent: float = 5,
                 every_s: float = 300, clock: Callable[[], float] = time.monotonic, **kwargs):
        # set before tqdm's __init__, which draws the first line
        self.out = out or sys.stdout
        self.every_percent, self.every_s, self.clock = every_percent, every_s, clock
        self._last: Optional[tuple] = None  # (step, postfix) of the last line
        self._last_bucket, self._last_t, self._closing = -1, 0.0, False
        kwargs.update(file=_Nowhere(), dynamic_ncols=False, bar_format=LINE_FORMAT)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None) -> bool:
        """Called by refresh() and close(): writes a line only when one is due."""
        n, now = self.n, self.clock()
        bucket = int(100 * n / (self.total * self.every_percent)) if self.total else 0
        # at the end (or a stop) the last figures, also for a step whose loss came after its line
        due = self._last is None or ((n, self.postfix) != self._last and (
            bucket > self._last_bucket or n == self.total or now - self._last_t >= self.every_s
            or self._closing))
        if due:
            self.out.write(self.format_meter(**self.format_dict) + "\n")
            self.out.flush()
            self._last, self._last_bucket, self._last_t = (n, self.postfix), bucket, now
        return True

    def close(self) -> None:
        self._closing = True
        super().close()

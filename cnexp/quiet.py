"""The third-party warnings and messages a cnexp run does not print, each with its reason.

`import cnexp` installs them (cnexp/__init__.py), before torch, Lightning, W&B or controlnet-aux
load, so every entry point (run.py, `python -m cnexp.*`, make's install check) prints cnexp's
words. Each entry names the module a message comes from and how the message starts: any other
warning from those libraries still shows, and so does every warning cnexp raises itself
(tests/test_first_run_words.py runs the default entry point and fails on any other warning).
docs/evaluation.md ("What a run prints") lists them; add an entry here with its reason, never a
whole category. What Lightning and W&B have a switch for is switched off where they are built
(cnexp/train.py).
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Quiet:
    """One known message: where it starts, how it reads, why a cnexp user need not see it."""
    category: type[Warning]  # a warning's class (its subclasses too); Warning for log lines
    module: str   # regex on the module that issues it (a warning: the caller `warn` names)
    message: str  # regex on the start of the message
    reason: str
    example: str  # the message as it was seen ...
    seen_in: str  # ... and the module it came from (tests check the entry hides exactly that)


# Python warnings. controlnet-aux's import (only the data.annotator path and make's install check
# import it; the tiny world's default run does not) warns about the packages it imports.
WARNINGS = (
    Quiet(UserWarning, r"controlnet_aux\.segment_anything\.",
          r"Overwriting tiny_vit_\w+ in registry",
          "controlnet-aux registers its tiny_vit models under timm's names; cnexp uses neither",
          "Overwriting tiny_vit_5m_224 in registry with controlnet_aux.segment_anything."
          "modeling.tiny_vit_sam.tiny_vit_5m_224.",
          "controlnet_aux.segment_anything.modeling.tiny_vit_sam"),
    Quiet(UserWarning, r"controlnet_aux\.mediapipe_face\.",
          r"The module 'mediapipe' is not installed",
          "only data.annotator=mediapipe_face needs mediapipe; cnexp/data/annotators.py checks "
          "for it when that annotator is asked for and names the fix",
          "The module 'mediapipe' is not installed. The package will have limited functionality.",
          "controlnet_aux.mediapipe_face.mediapipe_face_common"),
    Quiet(FutureWarning, r"timm\.models\.(layers|registry)\b", r"Importing from timm\.models\.",
          "controlnet-aux imports timm's old module paths; nothing a user changes",
          "Importing from timm.models.layers is deprecated, please import via timm.layers",
          "timm.models.layers"),
    Quiet(FutureWarning, r"torch\.jit\._script\b", r"`torch\.jit\.script` is deprecated",
          "controlnet-aux's teed and zoe annotators script functions when imported; cnexp "
          "never calls torch.jit", "`torch.jit.script` is deprecated. Please switch to "
          "`torch.compile` or `torch.export`.", "torch.jit._script"),
    Quiet(DeprecationWarning, r"controlnet_aux\.open_pose\.", r"Please import `gaussian_filter`",
          "controlnet-aux's openpose imports scipy's old ndimage.filters path",
          "Please import `gaussian_filter` from the `scipy.ndimage` namespace; the "
          "`scipy.ndimage.filters` namespace is deprecated", "controlnet_aux.open_pose.body"),
    # Lightning, at every fit
    Quiet(UserWarning, r"lightning\.pytorch\.trainer\.configuration_validator\b",
          r"You passed in a `val_dataloader` but have no `validation_step`",
          "cnexp evaluates in callbacks on the validation split (cnexp/metrics/callbacks.py); "
          "Lightning's own val loop is off on purpose (limit_val_batches=0)",
          "You passed in a `val_dataloader` but have no `validation_step`. Skipping val loop.",
          "lightning.pytorch.trainer.configuration_validator"),
    Quiet(UserWarning, r"lightning\.pytorch\.loops\.fit_loop\b",
          r"Found \d+ module\(s\) in eval mode at the start of training",
          "the frozen base (UNet, VAE, text encoder) stays in eval mode on purpose",
          "Found 524 module(s) in eval mode at the start of training. This may lead to "
          "unexpected behavior during training.", "lightning.pytorch.loops.fit_loop"),
    Quiet(FutureWarning, r"lightning\.pytorch\.utilities\._pytree\b",
          r"`isinstance\(treespec, LeafSpec\)` is deprecated",
          "Lightning's own use of a pytree API that torch deprecated; nothing a user changes",
          "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) "
          "and treespec.is_leaf()` instead.", "lightning.pytorch.utilities._pytree"),
    Quiet(UserWarning, r"lightning\.",
          r"The `srun` command is available on your system but is not used",
          "on a machine with SLURM installed; cnexp sends jobs to SLURM with hydra/launcher=slurm "
          "(docs/slurm.md), not by prepending srun, and inside a job Lightning finds SLURM itself",
          "The `srun` command is available on your system but is not used. HINT: If your "
          "intention is to run Lightning on SLURM, prepend your python command with `srun`",
          "lightning.fabric.plugins.environments.slurm"),
)

# Lightning's info lines (logging, not warnings; Lightning has no switch for these). Its
# rank_zero_info logs to one of these loggers (whichever Lightning package set it last).
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero",
                     "lightning.fabric.utilities.rank_zero", "lightning_utilities.core.rank_zero")
LOG_LINES = (
    Quiet(Warning, "lightning", r"(GPU|TPU|HPU) available: ",
          "cnexp's first line says the device and precision it chose (cnexp/device.py); Lightning "
          "still warns when a GPU is there but unused", "GPU available: False, used: False",
          RANK_ZERO_LOGGERS[0]),
    Quiet(Warning, "lightning", r"💡 Tip: ",
          "advertisements for Lightning's cloud services (litlogger, litmodels)",
          "💡 Tip: For seamless cloud logging and experiment tracking, try installing "
          "[litlogger](https://pypi.org/project/litlogger/)", RANK_ZERO_LOGGERS[0]),
    Quiet(Warning, "lightning", r"`Trainer\.fit` stopped: `max_steps=\d+` reached",
          "cnexp's summary says the steps it trained",
          "`Trainer.fit` stopped: `max_steps=2` reached.", RANK_ZERO_LOGGERS[0]),
)


class DropKnownLines(logging.Filter):
    """Drops the log records LOG_LINES names; every other record passes."""

    def __init__(self, entries: tuple[Quiet, ...] = LOG_LINES):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{q.message})" for q in entries))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def add_warning_filters() -> None:
    """WARNINGS as `ignore` filters, in front of the current ones: in front of -W and
    PYTHONWARNINGS (so `-W default` shows every other warning), behind any added later."""
    for q in WARNINGS:
        warnings.filterwarnings("ignore", message=q.message, category=q.category, module=q.module)


_installed = False


def install() -> None:
    """The warning filters and Lightning's log-line filter, once per process."""
    global _installed
    if _installed:
        return
    _installed = True
    add_warning_filters()
    drop = DropKnownLines()
    for name in RANK_ZERO_LOGGERS:  # a logger's filter sees the records made on that logger
        logging.getLogger(name).addFilter(drop)


def quiet_weight_loading_bars() -> None:
    """transformers' "Loading weights" bar, drawn for every encoder read from disk (a fraction of
    a second each here); the hub's download bars stay as the user has them."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    downloads_shown = not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # turns the hub's bars off too: undone below
    if downloads_shown:
        enable_progress_bars()

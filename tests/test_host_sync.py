"""No host sync in a steady-state step: a real tiny-world run counts every read of a tensor's
value into Python (`.item()`, `.tolist()`, `bool()`, `float()`, ...), the reads that make the CPU
wait for a GPU, and finds them only at the logging cadence (cnexp.cadence).

On a CPU nothing waits, so the test counts the reads themselves: each is a sync on a GPU. The data
path (the loader's fetch and collate, on_before_batch_transfer: host data that never was on the
device, and in worker processes on a GPU run) is not part of the step and is not counted.
"""
from __future__ import annotations

import collections
import traceback

import pytest
import torch
import torch.utils.data.dataloader as torch_loader
from conftest import compose_cfg

from cnexp.data.datamodule import TriplesDataModule
from cnexp.module import ControlNetModule
from cnexp.run.signals import StopSignals

READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
STEPS, EVERY = 12, 4


class ReadCounter:
    """Counts tensor reads per training batch (keyed by the steps done before it)."""

    def __init__(self):
        self.batch: int | None = None  # None: outside the training steps
        self.paused = 0
        self.reads: dict[int, list[str]] = collections.defaultdict(list)

    def wrap(self, name: str, original):
        def read(tensor, *args, **kwargs):
            if self.batch is not None and not self.paused:
                caller = traceback.extract_stack(limit=3)[0]
                self.reads[self.batch].append(f"{name} at {caller.filename}:{caller.lineno}")
            return original(tensor, *args, **kwargs)
        return read

    def pausing(self, original):
        def call(*args, **kwargs):
            self.paused += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.paused -= 1
        return call


@pytest.fixture
def counted(monkeypatch):
    counter = ReadCounter()
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counter.wrap(name, getattr(torch.Tensor, name)))

    def batch_start(module, batch, batch_idx):
        counter.batch = module.trainer.global_step

    monkeypatch.setattr(ControlNetModule, "on_train_batch_start", batch_start, raising=False)
    monkeypatch.setattr(ControlNetModule, "on_train_end",
                        lambda module: setattr(counter, "batch", None), raising=False)
    monkeypatch.setattr(TriplesDataModule, "on_before_batch_transfer",
                        counter.pausing(TriplesDataModule.on_before_batch_transfer))
    for owner, name in ((torch_loader.DataLoader, "__iter__"),  # a new epoch's iterator
                        (torch_loader._SingleProcessDataLoaderIter, "_next_data")):
        monkeypatch.setattr(owner, name, counter.pausing(getattr(owner, name)))
    return counter


def test_steady_state_steps_read_the_device_only_at_the_logging_cadence(tmp_path, counted):
    from cnexp.train import train

    cfg = compose_cfg([f"data.root={tmp_path / 'data'}", "data.train_size=24", "data.val_size=4",
                       "data.test_size=4", "data.batch_size=4", "eval.enabled=false",
                       "export=false", "logger.mode=disabled", f"trainer.max_steps={STEPS}",
                       f"trainer.log_every_n_steps={EVERY}", "trainer.enable_progress_bar=true",
                       "trainer.checkpoint_every_n_steps=1000", f"cache.dir={tmp_path / 'enc'}"],
                      out_dir=tmp_path / "run")
    signals = StopSignals()
    try:
        summary = train(cfg, signals)
    finally:
        signals.restore()
    assert summary["steps"] == STEPS and len(summary["losses"]) == STEPS // EVERY
    # steady state: after the first step (one-time set-up), before the last (the end's reads);
    # a batch is a log step when the steps done after it are a multiple of EVERY
    steady = range(1, STEPS - 1)
    log_steps = [b for b in steady if (b + 1) % EVERY == 0]
    elsewhere = {b: counted.reads[b] for b in steady if b not in log_steps and counted.reads[b]}
    assert not elsewhere, f"host reads in steps that do not log: {elsewhere}"
    at_log = sum(len(counted.reads[b]) for b in log_steps)
    assert at_log <= 8 * len(log_steps), {b: counted.reads[b] for b in log_steps}


def test_prompt_dropout_selects_on_the_device_exactly_what_the_caption_list_encodes(
        tiny_cfg, tiny_base):
    """The step chooses embeddings with torch.where instead of reading the dropout draw back:
    the same draw, the same rows as encoding drop_prompts' list (with the text cache: bitwise)."""
    from cnexp.control import build_controlnet
    from cnexp.encode_cache import FrozenEncoderCache

    module = ControlNetModule(tiny_base, build_controlnet(tiny_base.unet, tiny_cfg.control),
                              tiny_cfg.optim, seed=0,
                              cache=FrozenEncoderCache(latents=False, text=True))
    captions = [f"a {c} circle" for c in ("red", "green", "blue", "white")] * 4
    as_text = module.drop_prompts(captions, torch.Generator().manual_seed(3))
    assert 0 < as_text.count("") < len(captions)
    expected = module.encode_prompts(as_text)
    chosen = module.dropped_prompt_embeddings(captions, torch.Generator().manual_seed(3))
    assert torch.equal(chosen, expected)

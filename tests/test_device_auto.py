"""trainer=auto, the default (issue 22 item 2): a GPU when present (bf16-mixed where it has bf16
units, else 16-mixed), the CPU in fp32 otherwise, exactly as trainer=cpu; the run says so first."""
from __future__ import annotations

import logging

import pytest
import torch

import cnexp.train as train_module
from cnexp.device import Device, describe, resolve_device
from cnexp.precision import resolve_frozen_dtype

from conftest import compose_cfg, resolved


def fake_gpu(monkeypatch, bf16: bool = True, count: int = 1) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)


def no_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_auto_is_the_default_and_picks_a_gpu_in_bf16_where_it_can(monkeypatch):
    trainer = compose_cfg().trainer
    assert (trainer.accelerator, trainer.precision) == ("auto", "auto")
    fake_gpu(monkeypatch, bf16=True)
    assert resolve_device(trainer) == Device("gpu", "bf16-mixed", 1)
    assert resolve_frozen_dtype(trainer) == torch.bfloat16
    fake_gpu(monkeypatch, bf16=False)  # e.g. a V100 or T4: fp16 autocast, fp16 base
    assert resolve_device(trainer) == Device("gpu", "16-mixed", 1)
    assert resolve_frozen_dtype(trainer) == torch.float16
    no_gpu(monkeypatch)
    assert resolve_device(trainer) == Device("cpu", "32-true", 1)
    assert resolve_frozen_dtype(trainer) == torch.float32


def test_explicit_choices_stay_what_they_say(monkeypatch):
    fake_gpu(monkeypatch, bf16=False)
    assert resolve_device(compose_cfg(["trainer=cpu"]).trainer) == Device("cpu", "32-true", 1)
    assert resolve_device(compose_cfg(["trainer=gpu"]).trainer) == Device("gpu", "bf16-mixed", 1)
    assert resolve_device(compose_cfg(["trainer=ddp_cpu"]).trainer) == Device("cpu", "32-true", 2)
    assert resolve_device(compose_cfg(["trainer.precision=32-true"]).trainer) == \
        Device("gpu", "32-true", 1)
    assert resolve_device(compose_cfg(["trainer.accelerator=cpu"]).trainer) == \
        Device("cpu", "32-true", 1)  # precision auto follows the device
    no_gpu(monkeypatch)
    assert resolve_device(compose_cfg(["trainer.devices=2", "trainer.strategy=ddp"]).trainer) \
        == Device("cpu", "32-true", 2)


def test_the_default_on_a_cpu_trains_exactly_as_trainer_cpu(monkeypatch):
    """The tiny world's CPU numbers do not change: every trainer.* setting the run uses is
    trainer=cpu's, once auto is resolved."""
    no_gpu(monkeypatch)

    def effective(overrides):
        trainer = resolved(compose_cfg(overrides))["trainer"]
        device = resolve_device(compose_cfg(overrides).trainer)
        return {**trainer, "accelerator": device.accelerator, "precision": device.precision,
                "devices": device.devices}

    assert effective([]) == effective(["trainer=cpu"])
    assert effective(["trainer.devices=2", "trainer.strategy=ddp"]) == effective(
        ["trainer=ddp_cpu"])


def test_the_start_line_names_device_precision_and_frozen_dtype(monkeypatch):
    fake_gpu(monkeypatch, bf16=True, count=4)
    line = describe(resolve_device(compose_cfg().trainer), torch.bfloat16)
    assert "1 x NVIDIA H100 80GB HBM3 (4 visible; trainer.devices=4 trainer.strategy=ddp" in line
    assert "precision bf16-mixed" in line and "frozen base bfloat16" in line
    no_gpu(monkeypatch)
    line = describe(resolve_device(compose_cfg().trainer), torch.float32)
    assert line.startswith("cnexp: device cpu x 1") and "precision 32-true" in line
    assert "frozen base float32" in line


class StopHere(Exception):
    pass


def test_train_logs_its_device_before_loading_anything(monkeypatch, caplog, tmp_path):
    no_gpu(monkeypatch)

    def stop(*args, **kwargs):
        raise StopHere

    monkeypatch.setattr(train_module, "load_base", stop)  # the first heavy step
    caplog.set_level(logging.INFO, logger="cnexp")
    with pytest.raises(StopHere):
        train_module.train(compose_cfg(out_dir=tmp_path / "run"))
    lines = [r.getMessage() for r in caplog.records if r.name == "cnexp"]
    assert "cnexp: device cpu x 1" in lines[0] and "precision 32-true" in lines[0]
    assert "frozen base float32" in lines[0]

import socket
import subprocess
import sys
import time

import pytest

from cnexp.base import BaseModelUnavailable, load_base
from conftest import ROOT, compose_cfg


def test_tiny_bundle_loads_frozen(tiny_base):
    for model in (tiny_base.unet, tiny_base.vae, tiny_base.text_encoder):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
    assert tiny_base.prediction_type == "epsilon"
    assert tiny_base.latent_scale == 4  # 64 px -> 16x16 latents


def test_missing_local_base_fails_with_one_clear_message(tmp_path):
    cfg = compose_cfg([f"base.pretrained={tmp_path / 'nowhere'}"])
    with pytest.raises(BaseModelUnavailable, match="base=tiny") as err:
        load_base(cfg.base)
    assert str(tmp_path / "nowhere") in str(err.value)


def test_hub_id_offline_fails_at_once(monkeypatch):
    """Offline means no connection tried and no retry waited out (recorded, not timed)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_cfg(["base=sd15"])
    attempts = []
    monkeypatch.setattr(socket.socket, "connect", lambda sock, address: attempts.append(address))
    monkeypatch.setattr(socket.socket, "connect_ex",
                        lambda sock, address: attempts.append(address) or 111)
    monkeypatch.setattr(time, "sleep", lambda seconds: attempts.append(f"sleep {seconds}"))
    with pytest.raises(BaseModelUnavailable, match="stable-diffusion-v1-5/stable-diffusion-v1-5"):
        load_base(cfg.base)
    assert attempts == [], "offline, the hub client must not connect nor sit in its retry loop"


def test_run_py_offline_sd15_prints_the_message_not_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", "base=sd15", "logger.mode=disabled",
                           f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Cannot load the base model 'stable-diffusion-v1-5/stable-diffusion-v1-5'" in output
    assert "python run.py base=tiny" in output
    assert "Traceback" not in output

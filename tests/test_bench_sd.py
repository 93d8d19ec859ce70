"""The benchmark's SD-shaped mode (issue 12, item 4): published shapes, FLOP counting, MFU, the
peak-memory wrapper, and a CPU smoke run of `python -m cnexp.bench --sd 15` at a tiny width."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from cnexp.bench import flops
from cnexp.base import load_base
from cnexp.bench.sd import PEER, peak_memory, peer_losses_by_step
from cnexp.bench.sd_shapes import build_bundle, parameter_counts, scaled_configs
from conftest import ROOT


def _meta_params(configs):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel(**configs["unet"]),
                 "vae": AutoencoderKL(**configs["vae"]),
                 "text": CLIPTextModel(CLIPTextConfig(**configs["text"]))}
    return {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in parts.items()}


def test_width_one_has_the_published_parameter_counts():
    sd15 = _meta_params(scaled_configs("15"))
    assert sd15["unet"] == pytest.approx(859.52, abs=0.01)
    assert sd15["vae"] == pytest.approx(83.65, abs=0.01)
    assert sd15["text"] == pytest.approx(123.06, abs=0.01)
    sd21 = scaled_configs("21")
    assert sd21["unet"]["cross_attention_dim"] == sd21["text"]["hidden_size"] == 1024
    assert _meta_params(sd21)["unet"] == pytest.approx(865.91, abs=0.01)


def test_narrow_width_keeps_depth_and_divisibility():
    cfg = scaled_configs("21", 0.05)
    assert len(cfg["unet"]["block_out_channels"]) == 4 and cfg["unet"]["layers_per_block"] == 2
    for channels, heads in zip(cfg["unet"]["block_out_channels"], (5, 10, 20, 20)):
        assert channels % 32 == 0 and channels % heads == 0
    assert cfg["text"]["num_hidden_layers"] == 23 and cfg["text"]["hidden_size"] % 16 == 0


def test_step_flops_split_by_part_and_the_published_sd15_totals():
    parts = flops.step_flops(scaled_configs("15"), batch=8, resolution=512)
    tera = {k: v / 1e12 for k, v in parts.items()}
    # SD 1.5, 512 px, batch 8 (issue 12's counts: VAE 8.9, UNet 16.4, ControlNet 7.0, text 0.1)
    assert tera["vae"] == pytest.approx(8.93, abs=0.05)
    assert tera["text_encoder"] == pytest.approx(0.11, abs=0.02)
    assert 6.0 < tera["controlnet"] < 8.0 and 14.0 < tera["unet"] < 18.0
    trained = parts["controlnet"] + parts["unet"]
    # each cache removes its own encoder's share, and only that
    assert flops.executed(parts, latents_cached=False, text_cached=False) == \
        pytest.approx(sum(parts.values()), rel=1e-12)
    assert flops.executed(parts, latents_cached=True, text_cached=False) == \
        trained + parts["text_encoder"]
    assert flops.executed(parts, latents_cached=False, text_cached=True) == trained + parts["vae"]
    assert flops.executed(parts, latents_cached=True, text_cached=True) == trained


def test_mfu_against_the_known_peaks_and_none_elsewhere():
    assert flops.peak_tflops("NVIDIA H200") == flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert flops.mfu(989e12 * 0.5, 1.0, "NVIDIA H200", "bf16-mixed") == pytest.approx(0.5)
    assert flops.mfu(1e12, 1.0, None, "bf16-mixed") is None  # CPU
    assert flops.mfu(1e12, 1.0, "NVIDIA GeForce RTX 4090", "bf16-mixed") is None  # not listed
    assert flops.mfu(1e12, 1.0, "NVIDIA H100 PCIe", "32-true") is None


def test_the_bundle_loads_with_cnexps_loader(tmp_path):
    bundle = build_bundle(tmp_path / "bundle", "15", width=0.05)
    base = load_base(OmegaConf.create({"pretrained": str(bundle), "revision": None,
                                       "variant": None}))
    assert base.tokenizer.model_max_length == 77 and base.latent_scale == 8
    assert base.unet.config.cross_attention_dim == base.text_encoder.config.hidden_size
    ids = base.tokenizer(["a red circle"], padding="max_length", return_tensors="pt").input_ids
    assert base.text_encoder(ids)[0].shape[1] == 77
    assert parameter_counts(bundle)["unet"] == pytest.approx(
        sum(p.numel() for p in base.unet.parameters()) / 1e6)


def test_peer_losses_by_step_and_the_peak_line():
    out = ("Steps:  50%| 1/2 [00:01<00:01, 1.2s/it]\rSteps:  50%| 1/2 [00:01, loss=0.5, lr=1e-05]"
           "\rSteps: 100%| 2/2 [00:02, loss=0.5, lr=1e-05]\rSteps: 100%| 2/2 [00:02, loss=0.25, "
           "lr=1e-05]\n")
    assert peer_losses_by_step(out) == {1: 0.5, 2: 0.25}
    line = "...\nCNEXP_PEAK device='NVIDIA H200' gpu_bytes=2147483648\n"
    assert peak_memory(line) == ("NVIDIA H200", 2 ** 31) and peak_memory("none") == (None, None)


def test_peak_wrapper_runs_the_script_as_main(tmp_path):
    script = tmp_path / "child.py"
    (tmp_path / "helper.py").write_text("VALUE = 7\n")
    script.write_text("import sys, helper\nprint(__name__, sys.argv[1:], helper.VALUE)\n")
    out = subprocess.run([sys.executable, "-m", "cnexp.bench.child", str(script), "--x=1"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "__main__ ['--x=1'] 7"
    assert ("CNEXP_PEAK" in out) == torch.cuda.is_available()


@pytest.mark.slow
def test_sd_mode_smoke_on_cpu(tmp_path):
    """The whole SD-shaped bench at width 0.05, 64 px, 1+1 steps; cnexp's side only (the peer
    needs a diffusers checkout). Timings are not asserted: 1 step on a shared CPU is noise."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "cnexp.bench", "--sd", "15", "--width", "0.05",
                           "--resolution", "64", "--batch", "2", "--images", "8", "--warmup", "1",
                           "--steps", "1", "--rounds", "1", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MFU" in proc.stdout and "TFLOP/step" in proc.stdout
    report = json.loads(out.read_text())
    rows = {r["trainer"]: r for r in report["rows"]}
    assert set(rows) == {"cnexp", "cnexp (no cache)"} and PEER not in rows
    for row in rows.values():
        assert row["mfu"] is None and row["device"] == "cpu" and row["peak_gpu_gib"] is None
        assert math.isfinite(row["step_s"]) and row["peak_rss_mib"] > 100
        assert row["loss"] is not None and 0 < row["loss"] < 10
    assert rows["cnexp (no cache)"]["tflop_step"] > rows["cnexp"]["tflop_step"] > 0
    assert rows["cnexp"]["loss"] == rows["cnexp (no cache)"]["loss"]  # the same draws
    setup = report["setup"]
    assert setup["params_m"]["unet"] > 0 and all(v > 0 for v in setup["flops"].values())

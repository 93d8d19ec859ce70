"""The plan's memory and time estimate for the published bases (cnexp/launch/memory.py): exact
parameter counts of the published architectures built on the meta device, the estimate moving
the right way with each lever, the calibration reproducing diffusers' Flux figure, a refusal that
names the levers, and `python -m cnexp.plan base=flux` offline."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from cnexp.launch.geometry import build, measure, published_parts
from cnexp.launch.memory import GiB, Setting, estimate, flops_per_sample
from cnexp.launch.plan import main
from cnexp.launch.plan_memory import access_refusal, licence
from cnexp.launch.published import BUNDLES, BY_FAMILY
from conftest import ROOT, compose_cfg

SDXL, SD35M = "stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-3.5-medium"
SD35L, FLUX = "stabilityai/stable-diffusion-3.5-large", "black-forest-labs/FLUX.1-dev"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def params(repo: str, part: str) -> int:
    return sum(p.numel() for p in build(*BUNDLES[repo]["parts"][part]).parameters())


@pytest.mark.parametrize("repo, part, published", [
    (SDXL, "unet", 2_567_463_684),  # SDXL's UNet, "2.6B"
    (SDXL, "vae", 83_653_863),
    (SDXL, "text_encoder", 123_060_480),  # CLIP ViT-L/14's text tower
    (SDXL, "text_encoder_2", 694_659_840),  # OpenCLIP bigG's, with its projection
    (FLUX, "transformer", 11_901_408_320),  # FLUX.1-dev, "12B"
    (FLUX, "text_encoder_2", 4_762_310_656),  # the T5-XXL v1.1 encoder, "4.7B"
    (SD35L, "transformer", 8_056_627_520),  # SD3.5 Large, "8.1B"
])
def test_the_published_architectures_have_their_published_sizes(repo, part, published):
    assert params(repo, part) == published


def test_sd35_medium_is_its_2_5b_with_the_position_embedding():
    """diffusers keeps SD3.5 Medium's 384x384 position embedding as a buffer, not a parameter:
    with it, the "2.5B" of the model card."""
    model = build(*BUNDLES[SD35M]["parts"]["transformer"])
    weights = sum(p.numel() for p in model.parameters())
    assert weights == 2_243_171_520
    assert abs(weights + model.pos_embed.pos_embed.numel() - 2.5e9) < 0.05e9
    assert abs(params(SD35L, "transformer") - 8.1e9) < 0.05e9


def test_the_token_counts_are_the_families_own():
    from cnexp.families import flux_control, sd3

    assert BY_FAMILY["sd3"]["tokens"]["text_encoder_3"] == sd3.T5_TOKENS
    assert BY_FAMILY["flux"]["tokens"]["text_encoder_2"] == flux_control.MAX_T5_TOKENS
    layers = BY_FAMILY["flux"]["controlnet"][1]
    assert (layers["num_layers"], layers["num_single_layers"]) == flux_control.PEER_LAYERS


@pytest.fixture(scope="module")
def flux():
    cfg = compose_cfg(["base=flux"])
    return cfg, measure(cfg, None, 512)


def test_the_calibration_reproduces_the_flux_peers_58_gib(flux):
    """README_flux.md: ~30G with the bf16 transformer and VAE and the fp32 ControlNet on the
    GPU (the unit is GiB: the script's 4+4-block ControlNet gives 29.95), ~58G in training at
    512 px, batch 1, no gradient checkpointing."""
    _, g = flux
    assert g.params["branch"] == 2_046_461_952 and g.trained == g.params["branch"]
    resident = (g.params["transformer"] + g.params["vae"]) * 2 + g.params["branch"] * 4
    assert abs(resident / GiB - 30) < 0.1
    peer = Setting(batch=1, resolution=512, frozen_bytes=2, compute_bytes=2,
                   checkpointing=False, eight_bit=False, cache_text=True, cache_latents=True)
    assert abs(estimate(g, peer).total / GiB - 58) < 0.3


def test_each_lever_moves_the_estimate_its_way(flux):
    cfg, g = flux
    base = Setting(batch=2, resolution=512, frozen_bytes=4, compute_bytes=2,
                   checkpointing=False, eight_bit=False, cache_text=False, cache_latents=False)
    before = estimate(g, base)
    for field, value, part in [("frozen_bytes", 2, "frozen"), ("checkpointing", True,
                                                                "activations"),
                               ("eight_bit", True, "trained"), ("cache_text", True, "text"),
                               ("batch", 1, "activations")]:
        after = estimate(g, dataclasses.replace(base, **{field: value}))
        assert getattr(after, part) < getattr(before, part), field
        assert after.total < before.total, field
    assert estimate(g, base).text == pytest.approx(4.885e9 * 4, rel=1e-3)  # CLIP-L + T5-XXL
    assert estimate(g, dataclasses.replace(base, batch=4)).activations == \
        pytest.approx(2 * before.activations)
    fp32 = estimate(g, dataclasses.replace(base, compute_bytes=4)).activations
    assert fp32 == pytest.approx(2 * before.activations)
    smaller = measure(cfg, None, 384)  # fewer tokens: fewer units, fewer FLOPs
    assert estimate(smaller, dataclasses.replace(base, resolution=384)).activations < \
        before.activations
    # time: recomputation, the text encoders and the VAE cost FLOPs; caches save them
    assert flops_per_sample(g, dataclasses.replace(base, checkpointing=True)) > \
        flops_per_sample(g, base) > flops_per_sample(g, dataclasses.replace(
            base, cache_text=True, cache_latents=True))
    assert flops_per_sample(smaller, base) < flops_per_sample(g, base)


def plan(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_step_that_does_not_fit_is_refused_naming_its_levers(capsys):
    code, out, err = plan(capsys, "--gpu", "A100-40", "base=flux", "trainer.frozen_dtype=fp32",
                          "cache.text=false", "data.batch_size=2")
    assert code == 2
    assert "does NOT fit" in out and "NVIDIA A100 40GB (named: --gpu)" in out
    refusal = next(line for line in err.splitlines() if "the training step needs" in line)
    for lever in ("trainer.frozen_dtype=bf16", "trainer.gradient_checkpointing=true",
                  "optim.eight_bit=true", "cache.text=true", "data.resolution=384",
                  "data.batch_size=1 trainer.accumulate_grad_batches=32"):
        assert f"{lever} (-" in refusal, lever
    assert "still too much" in refusal  # Flux's bf16 weights alone fill most of 40 GB
    # what fits is not refused for memory, and an unknown GPU is refused by name
    code, out, err = plan(capsys, "--gpu", "H200", "base=sdxl")
    assert "fits" in out and "the training step needs" not in err
    code, _, err = plan(capsys, "--gpu", "V100", "base=sdxl")
    assert code == 2 and "--gpu V100 is not one cnexp knows" in err


def test_a_bundles_own_configs_are_read_before_the_published_ones(tmp_path):
    """A local copy (base.pretrained=/path) is sized from its model_index.json and config.json
    files: no weights needed."""
    bundle = tmp_path / "sdxl"
    index = {}
    for name, (library, cls, config) in BUNDLES[SDXL]["parts"].items():
        (bundle / name).mkdir(parents=True)
        (bundle / name / "config.json").write_text(json.dumps(config))
        index[name] = [library, cls]
    (bundle / "model_index.json").write_text(json.dumps(index))
    parts, source = published_parts(SDXL, str(bundle))
    assert source == f"the configs in {bundle}" and set(parts) == set(index)
    cfg = compose_cfg(["base=sdxl", f"base.pretrained={bundle}"])
    g = measure(cfg, str(bundle), 1024)
    assert g.params["unet"] == 2_567_463_684 and g.trained == 1_251_014_160
    assert published_parts("someone/unknown", None) is None


def test_the_tiny_world_and_a_cpu_job_get_no_gpu_estimate(capsys, tmp_path):
    _, out, _ = plan(capsys, "trainer=cpu", f"data.root={tmp_path / 'data'}")
    assert "\n  memory" not in out and "\n  gpu" not in out
    _, out, _ = plan(capsys, "base=flux", "trainer=cpu")
    assert "memory        not estimated: the job trains on the CPU" in out
    # a random bundle built on first use is planned, not refused as a missing directory
    code, out, err = plan(capsys, "base=tiny_flux", "trainer=cpu",
                          f"base.pretrained={tmp_path / 'bundle'}")
    assert code == 0, err
    assert "a random flux bundle, built on first use" in out


def test_a_gated_base_is_refused_before_a_job_when_the_token_cannot_download_it(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(repo):
        raise GatedRepoError.__new__(GatedRepoError)

    monkeypatch.setattr(huggingface_hub, "auth_check", gated)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    refusal = access_refusal(FLUX, FLUX)  # on the hub, not in the cache: it would download
    assert refusal.startswith(f"base.pretrained={FLUX} is gated and no Hugging Face token is set")
    assert "huggingface-cli login" in refusal and f"https://huggingface.co/{FLUX}" in refusal
    assert access_refusal(FLUX, "/a/local/copy") is None  # nothing to download
    assert licence(SDXL) == "" and "is gated" in licence(SD35M)


def test_plan_flux_offline_prints_memory_time_and_what_the_hub_needs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cnexp.plan", "base=flux"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                               "CUDA_VISIBLE_DEVICES": ""})
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 2, err  # the base is not here: refused, after the estimate
    lines = {line[2:16].strip(): line[16:] for line in out.splitlines() if line.startswith("  ")}
    assert lines["gpu"].startswith("NVIDIA H100 80GB SXM (assumed: no GPU here")
    assert lines["memory"].startswith("~58.0 GiB peak per GPU in training, fits (bf16-mixed")
    assert "transformer 11.901B + VAE 83.8M params at 2 bytes" in lines["- frozen"]
    assert lines["- trained"].startswith("30.5 GiB: 2.046B params")
    assert "gradient checkpointing off (with it on:" in lines["- activations"]
    assert "optim.eight_bit=true -11.4 GiB" in lines["levers"]
    assert "s per step" in lines["step time"] and "35% MFU" in lines["step time"]
    # 4000 tiny-world captions + the empty one, T5's 512 x 4096 bf16 = 4 MiB each
    assert "4001 captions' text 513x4096" in lines["encoder cache"]
    assert "of which T5's 512 tokens x 4096 = 4.0 MiB" in lines["encoder cache"]
    refusal = next(line for line in err.splitlines() if "cannot be loaded" in line)
    for words in ("HF_HUB_OFFLINE", "base.pretrained=/path/to/bundle",
                  f"{FLUX} is gated: accept its licence", "HF_TOKEN"):
        assert words in refusal, words

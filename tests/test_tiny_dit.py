"""The tiny world's transformer base (cnexp/tinyworld/dit.py, base=tiny_dit): a build of a few
steps is a bundle the SD3 family loads, on the UNet base's VAE and CLIP, that a ControlNet run
trains on and samples through diffusers' SD3 ControlNet pipeline; two builds are identical."""
import inspect
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_cfg
from safetensors.torch import load_file
from transformers import CLIPTextModel

from cnexp.errors import CnexpError
from cnexp.tinyworld import dit

TINY_BUILD = {"world": TINY, "n_images": 32, "steps": 3, "batch": 4}  # the shipped shape
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
BUILD = dit.build  # before any test replaces it


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinydit")
    return [dit.build(root / name, **TINY_BUILD) for name in ("a", "b")]


def test_two_builds_are_identical_and_trained(builds):
    first, second = (load_file(path / WEIGHTS) for path in builds)
    assert first.keys() == second.keys()
    assert [k for k in first if not torch.equal(first[k], second[k])] == []
    info = json.loads((builds[0] / "build_info.json").read_text())
    torch.manual_seed(0)  # the build's initial weights, untrained
    initial = dit.tiny_transformer(info["width"], info["layers"], info["heads"], 128).state_dict()
    assert any(not torch.equal(initial[k], first[k]) for k in first)  # the steps trained it
    assert info["steps"] == 3 and len(info["losses_every_100_steps"]) == 2
    assert info["torch"] == torch.__version__ and info["seconds"] >= 0


def test_the_sd3_family_loads_it_on_the_tiny_worlds_vae_and_clip(builds):
    from cnexp.base import load_base

    cfg = compose_cfg(["base=tiny_dit", f"base.pretrained={builds[0]}"])
    assert cfg.base.family == "sd3" and cfg.base.clip_model.endswith("tinyworld/clip")
    base = load_base(cfg.base)
    assert base.extra["text_encoder_3"] is None and base.extra["tokenizer_3"] is None
    config = base.unet.config
    assert (config.patch_size, config.in_channels, config.joint_attention_dim) == (2, 4, 128)
    assert base.noise_scheduler.config.shift == 1.0
    assert base.vae.config.shift_factor == 0.0  # SD3's pipelines subtract it: a number
    world_vae = load_file(TINY / "vae" / "diffusion_pytorch_model.safetensors")
    vae = base.vae.state_dict()
    assert all(torch.equal(vae[k], world_vae[k]) for k in world_vae)
    ids = base.tokenizer(["a red circle"], padding="max_length", return_tensors="pt").input_ids
    world_text = CLIPTextModel.from_pretrained(TINY / "text_encoder").eval()
    with torch.no_grad():  # both CLIP slots: the UNet base's text encoder, plus its projection
        expected = world_text(ids).last_hidden_state
        for encoder in (base.text_encoder, base.extra["text_encoder_2"]):
            torch.testing.assert_close(encoder(ids).last_hidden_state, expected)


def test_a_controlnet_run_trains_on_it_and_samples(builds, tmp_path):
    from cnexp.train import train

    summary = train(compose_cfg([
        "base=tiny_dit", f"base.pretrained={builds[0]}", f"data.root={tmp_path / 'data'}",
        "data.train_size=8", "data.val_size=2", "data.test_size=2", "data.batch_size=2",
        "data.eval_size=2", "trainer.max_steps=2", "sampling.steps=2", "logger.mode=disabled",
        "logger.csv=false", "trainer.enable_progress_bar=false", "eval.prompt_settings=[perfect]",
        "eval.fid=false", "eval.curve_images=2"], out_dir=tmp_path / "run"))
    assert summary["steps"] == 2 and summary["controlnet_class"] == "SD3ControlNetModel"
    assert summary["base_damage_step0"] == 0.0
    assert summary["step0"]["eval/copy_drift"] == 0.0 < summary["final"]["eval/copy_drift"]
    assert 0.0 <= summary["final"]["eval/perfect/kind_acc"] <= 1.0  # sampled and scored
    assert (tmp_path / "run" / "controlnet" / "config.json").exists()


def test_a_build_without_the_unet_base_names_the_fix(tmp_path):
    with pytest.raises(CnexpError, match="no vae, clip, tokenizer there; build the UNet base "
                                         r"first \(make tinyworld\)"):
        dit.build(tmp_path / "out", world=tmp_path / "nothing", steps=1)


def test_save_every_keeps_the_base_as_it_was_at_those_steps(builds, tmp_path):
    out = dit.build(tmp_path / "out", **TINY_BUILD, save_every=2)
    assert sorted(p.name for p in out.glob("step-*")) == ["step-2"]  # the last is `out` itself
    at_2, final = load_file(out / "step-2" / WEIGHTS), load_file(out / WEIGHTS)
    assert any(not torch.equal(at_2[k], final[k]) for k in final)  # one more step moved it
    same = load_file(builds[0] / WEIGHTS)  # saving on the way changes nothing at the end
    assert all(torch.equal(same[k], final[k]) for k in final)
    assert (out / "step-2" / "model_index.json").exists()


def test_the_command_line_builds_the_shipped_recipe_and_passes_each_flag(monkeypatch, tmp_path):
    called = []
    monkeypatch.setattr(dit, "build", lambda **kwargs: called.append(kwargs))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: called.append({"threads": n}))
    dit.main([])
    assert called[0] == {"threads": 2}
    assert called[1] == {"out": Path("assets/tinydit"), **dit.SHIPPED}
    assert set(dit.SHIPPED) == set(inspect.signature(BUILD).parameters) - {"out"}
    assert dit.SHIPPED["steps"] == 15000  # the build docs/tinyworld.md measures
    dit.main(["--out", str(tmp_path), "--images", "7", "--steps", "9", "--lr", "0.5",
              "--save-every", "3"])
    assert {k: called[3][k] for k in ("out", "n_images", "steps", "lr", "save_every")} == {
        "out": tmp_path, "n_images": 7, "steps": 9, "lr": 0.5, "save_every": 3}

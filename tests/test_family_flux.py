"""The Flux family (cnexp/families/flux.py, flux_control.py) on base=tiny_flux, a random bundle of
diffusers' tiny Flux test shapes at 64 px: `python run.py base=tiny_flux` trains, evaluates and
exports a FluxControlNetModel that diffusers' FluxControlNetPipeline loads and samples; the
training step is train_controlnet_flux.py's objective; a resume continues to the same weights;
and each ablation axis changes on Flux exactly what it says."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxPipeline
from omegaconf import OmegaConf
from safetensors.torch import load_file

from cnexp.control import build_controlnet, count_trainable
from cnexp.control.base_damage import base_damage
from cnexp.errors import ConfigError
from cnexp.families.family import get_family, unpack_text
from cnexp.families.flux_control import image_ids, pack_latents, unpack_latents
from cnexp.module import ControlNetModule
from conftest import ROOT, compose_cfg

SMALL = ["base=tiny_flux", "data.train_size=16", "data.val_size=8", "data.test_size=8",
         "data.batch_size=4", "data.eval_size=4", "sampling.steps=2", "logger.mode=disabled",
         "logger.csv=false", "trainer.enable_progress_bar=false"]
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a small star"]


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(config, base, family) for base=tiny_flux: the bundle built into the session's cache."""
    from cnexp.base import load_base

    cfg = compose_cfg([*SMALL, f"data.root={tmp_path_factory.mktemp('data')}"],
                      out_dir=tmp_path_factory.mktemp("out"))
    base = load_base(cfg.base)
    return cfg, base, get_family(base.family)


def module_for(flux, optim=None, **control) -> ControlNetModule:
    cfg, base, family = flux
    control_cfg = OmegaConf.merge(cfg.control, control)
    branch = family.branch(control_cfg.branch)
    controlnet = build_controlnet(family.denoiser(base), control_cfg, branch)
    return ControlNetModule(base, controlnet, OmegaConf.merge(cfg.optim, optim or {}),
                            branch=branch)


def batch(n=4, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, 64, 64, generator=g) * 2 - 1,
            "condition": torch.rand(n, 3, 64, 64, generator=g), "caption": CAPTIONS[:n]}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, flux):
    """A 2-step `python run.py base=tiny_flux` with its evaluations at step 0 and at the end."""
    root = tmp_path_factory.mktemp("flux-run")
    done = subprocess.run([sys.executable, "run.py", *SMALL, f"hydra.run.dir={root / 'run'}",
                           f"data.root={root / 'data'}", "trainer.max_steps=2",
                           "eval.prompt_settings=[perfect]", "eval.curve_images=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root / "run"


def test_run_py_trains_evaluates_and_exports(run_dir):
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["steps"] == 2 and summary["controlnet_class"] == "FluxControlNetModel"
    assert summary["base_damage_step0"] == 0.0  # zero connectors: step 0 is the base
    assert summary["step0"]["eval/copy_drift"] == 0.0 < summary["final"]["eval/copy_drift"]
    assert {"eval/perfect/fid", "eval/perfect/shape_iou"} <= set(summary["final"])
    assert all(torch.isfinite(torch.tensor(row["train/loss"])) for row in summary["losses"])


def test_the_export_loads_in_diffusers_flux_controlnet_pipeline_and_samples(run_dir, flux):
    _, base, _ = flux
    weights = load_file(run_dir / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert weights["controlnet_blocks.0.weight"].abs().sum() > 0  # trained off its zero start
    pipe = FluxControlNetPipeline.from_pretrained(
        base.source, controlnet=FluxControlNetModel.from_pretrained(run_dir / "controlnet"))
    images = pipe(prompt=CAPTIONS[:2], control_image=torch.rand(2, 3, 64, 64), height=64,
                  width=64, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=32,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


def test_a_resume_continues_to_the_weights_of_an_uninterrupted_run(tmp_path):
    from cnexp.train import train

    def run(out, *extra):
        return train(compose_cfg([*SMALL, f"data.root={tmp_path / 'data'}", "eval.enabled=false",
                                  *extra], out_dir=out))

    run(tmp_path / "straight", "trainer.max_steps=3")
    run(tmp_path / "resumed", "trainer.max_steps=1")
    summary = run(tmp_path / "resumed", "trainer.max_steps=3", "ckpt_path=last")
    assert summary["resumed_at"] == [1] and summary["steps"] == 3
    a, b = (load_file(tmp_path / name / "controlnet" / "diffusion_pytorch_model.safetensors")
            for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_packing_and_text_are_the_flux_pipelines(flux):
    _, base, family = flux
    latents = torch.randn(2, 4, 16, 16)
    packed = pack_latents(latents)  # (2, 64, 16)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 16, 16))
    assert torch.equal(unpack_latents(packed, 16, 16), latents)
    assert torch.equal(image_ids(16, 16, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32))
    pipe = FluxPipeline(**{k: v for k, v in family.pipeline_parts(base, None).items()
                           if k != "pipeline_class"}, transformer=base.unet)
    states, pooled, _ = pipe.encode_prompt(CAPTIONS, CAPTIONS, max_sequence_length=32)
    ours = unpack_text(family.encode_text(base, CAPTIONS, "cpu"), pooled.shape[-1])
    torch.testing.assert_close(ours[0], states)
    torch.testing.assert_close(ours[1], pooled)


def test_the_training_step_is_train_controlnet_flux_objective(flux):
    """diffusion_loss against the same draws made by hand, in diffusers' own packing: logit-normal
    timesteps on the schedule, (1 - s) x + s noise, target noise - x, t / 1000, guidance 3.5,
    the control image through the VAE mean."""
    _, base, family = flux
    module = module_for(flux, connector_init="gaussian")  # the control acts: it must be wired
    data = batch()
    with torch.no_grad():
        loss = module.diffusion_loss(data, torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(3)
        latents = module.encode_images(data["image"], g)  # (4, 4, 16, 16)
        text = module.dropped_prompt_embeddings(data["caption"], g)
        noise = torch.randn(latents.shape, generator=g)
        u = torch.sigmoid(torch.randn((4,), generator=g))
        t = base.noise_scheduler.timesteps[(u * 1000).long()]
        s = base.noise_scheduler.sigmas[(u * 1000).long()].view(-1, 1, 1, 1)
        vae = base.vae.config
        control = (base.vae.encode(data["condition"] * 2 - 1).latent_dist.mean
                   - vae.shift_factor) * vae.scaling_factor
        states, pooled = unpack_text(text, 32)
        kwargs = dict(hidden_states=FluxPipeline._pack_latents((1 - s) * latents + s * noise,
                                                               4, 4, 16, 16),
                      timestep=t / 1000, guidance=torch.full((4,), 3.5), pooled_projections=pooled,
                      encoder_hidden_states=states, txt_ids=torch.zeros(states.shape[1], 3),
                      img_ids=FluxPipeline._prepare_latent_image_ids(4, 8, 8, "cpu", s.dtype),
                      return_dict=False)
        blocks, singles = module.controlnet(
            controlnet_cond=FluxPipeline._pack_latents(control, 4, 4, 16, 16), **kwargs)
        pred = base.unet(controlnet_block_samples=blocks, controlnet_single_block_samples=singles,
                         **kwargs)[0]
        expected = F.mse_loss(pred, FluxPipeline._pack_latents(noise - latents, 4, 4, 16, 16))
    torch.testing.assert_close(loss, expected)


def test_zero_connectors_leave_the_base_and_the_copy_unchanged_gaussian_ones_do_not(flux):
    _, base, _ = flux
    data = batch(seed=1)
    for scope in ("connectors", "connectors_and_hint"):
        zero = module_for(flux, connector_init="zero", init_scope=scope)
        assert base_damage(zero, data) == 0.0  # predictions bit-identical
        assert base_damage(module_for(flux, connector_init="gaussian", init_scope=scope),
                           data) > 0
    hint = module_for(flux, connector_init="gaussian", init_scope="connectors_and_hint")
    assert hint.controlnet.controlnet_x_embedder.weight.std() > 0  # the hint: x_embedder
    copied = zero.branch.copied_from_base(zero.controlnet, base.unet)
    assert any(name.startswith("single_transformer_blocks.0.") for name in copied)
    assert copied and all(torch.equal(p, q) for p, q in copied.values())  # copy drift 0


def test_scratch_is_the_copy_uncopied_and_lite_is_smaller(flux):
    _, base, _ = flux
    copy, scratch, lite = (module_for(flux, branch=b) for b in ("copy", "scratch", "lite"))
    name = "transformer_blocks.0.attn.to_q.weight"
    copied = dict(copy.controlnet.named_parameters())[name]
    assert torch.equal(copied, dict(base.unet.named_parameters())[name])
    assert not torch.equal(dict(scratch.controlnet.named_parameters())[name], copied)
    assert scratch.branch.copied_from_base(scratch.controlnet, base.unet) == {}
    assert count_trainable(scratch.controlnet) == count_trainable(copy.controlnet)
    assert count_trainable(lite.controlnet) < count_trainable(copy.controlnet)
    assert (len(lite.controlnet.transformer_blocks), len(lite.controlnet.single_transformer_blocks),
            len(copy.controlnet.single_transformer_blocks)) == (1, 0, 1)
    data = batch(seed=2)
    assert base_damage(lite, data) == 0.0  # no single-block samples: the transformer runs as is


def test_prompt_dropout_blanks_every_text_input_together(flux):
    _, base, family = flux
    noisy = torch.zeros(4, 4, 16, 16)
    for rate in (1.0, 0.0):
        module = module_for(flux, optim={"prompt_dropout": rate})
        text = module.dropped_prompt_embeddings(CAPTIONS, torch.Generator().manual_seed(0))
        got = family.conditioning(base, text, noisy)
        empty = family.conditioning(base, module.empty_prompt().expand_as(text), noisy)
        captions = family.conditioning(base, module.encode_prompts(CAPTIONS), noisy)
        want = empty if rate == 1.0 else captions
        for key in ("encoder_hidden_states", "pooled_projections"):  # T5 states, CLIP pooled
            assert torch.equal(got[key], want[key]), (rate, key)
            assert not torch.equal(empty[key], captions[key])


def test_condition_dropout_zeroes_what_the_control_reads(flux, monkeypatch):
    _, base, family = flux
    data = batch(seed=3)
    for rate in (1.0, 0.0):
        module, seen = module_for(flux, optim={"condition_dropout": rate}), []
        real = type(family).control_input
        monkeypatch.setattr(family, "control_input",
                            lambda b, c: seen.append(c) or real(family, b, c))
        with torch.no_grad():
            module.diffusion_loss(data, torch.Generator().manual_seed(0))
        want = torch.zeros_like(data["condition"]) if rate == 1.0 else data["condition"]
        assert len(seen) == 1 and torch.equal(seen[0], want), rate


@pytest.mark.parametrize("knobs,words", [
    ({"branch": "xs"}, "ControlNet-XS"), ({"branch": "t2i_adapter"}, "T2I-Adapter"),
    ({"branch": "lora_copy"}, "lora_copy"), ({"sd_locked": False}, "no UNet decoder"),
    ({"only_mid_control": True}, "no middle block"),
    ({"connector": "cross_norm", "connector_init": "default"}, "connector=conv"),
])
def test_what_does_not_apply_to_flux_is_refused_by_name(flux, knobs, words):
    from cnexp.validate import validate

    cfg = flux[0].copy()
    cfg.control = OmegaConf.merge(cfg.control, knobs)
    with pytest.raises(ConfigError, match="base.family=flux") as refused:
        validate(cfg, warn=False)
    assert words in str(refused.value)
    if "branch" in knobs:
        assert "use one of copy, scratch, lite" in str(refused.value)

"""The SD3 family (cnexp/families/sd3.py, sd3_control.py) on base=tiny_sd3, a random bundle of
diffusers' tiny SD3 test shapes built on first use: a run trains, evaluates and exports an
SD3ControlNetModel that diffusers' own pipeline samples, a resume continues to the same
weights, the prompts encode as diffusers' pipeline encodes them, and every axis changes on SD3
what it says."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg
from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline
from omegaconf import OmegaConf
from safetensors.torch import load_file

from cnexp.control import build_controlnet, count_trainable
from cnexp.control.base_damage import base_damage
from cnexp.errors import ConfigError
from cnexp.families.family import get_family
from cnexp.module import ControlNetModule

RUN = ["base=tiny_sd3", "data.train_size=16", "data.val_size=4", "data.test_size=4",
       "data.batch_size=4", "data.eval_size=2", "sampling.steps=2", "logger.mode=disabled",
       "logger.csv=false", "trainer.enable_progress_bar=false"]
QUIET = ["eval.enabled=false"]
CAPTIONS = ["a red circle", "a blue square"]


def train_run(root, out, *extra) -> dict:
    from cnexp.train import train

    return train(compose_cfg([*RUN, f"data.root={root / 'data'}", *extra], out_dir=out))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An evaluated 2-step run; a straight 4-step run; a 2-step run resumed to 4."""
    root = tmp_path_factory.mktemp("sd3")
    evaluated = train_run(root, root / "evaluated", "trainer.max_steps=2",
                          "eval.prompt_settings=[perfect]", "eval.fid=false", "eval.curve_images=2")
    train_run(root, root / "straight", "trainer.max_steps=4", *QUIET)
    train_run(root, root / "resumed", "trainer.max_steps=2", *QUIET)
    resumed = train_run(root, root / "resumed", "trainer.max_steps=4", "ckpt_path=last", *QUIET)
    return root, evaluated, resumed


def test_a_run_trains_evaluates_and_exports_what_diffusers_samples(runs):
    root, summary, _ = runs
    assert summary["steps"] == 2 and summary["controlnet_class"] == "SD3ControlNetModel"
    assert summary["base_damage_step0"] == 0.0  # zero connectors: step 0 is the base
    assert summary["step0"]["eval/copy_drift"] == 0.0 < summary["final"]["eval/copy_drift"]
    assert "eval/perfect/shape_iou" in summary["final"]  # sampled through the SD3 pipeline
    control = SD3ControlNetModel.from_pretrained(root / "evaluated" / "controlnet")
    assert any(torch.count_nonzero(block.weight) > 0 for block in control.controlnet_blocks)
    # the pipeline then feeds it the pooled text and shifted latents, as cnexp trained it
    assert control.config.force_zeros_for_pooled_projection is False
    pipe = StableDiffusion3ControlNetPipeline.from_pretrained(
        OmegaConf.select(compose_cfg(RUN), "base.pretrained"), controlnet=control)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(CAPTIONS[0], control_image=torch.rand(1, 3, 64, 64), height=64, width=64,
               num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_a_resume_continues_to_the_straight_runs_weights(runs):
    root, _, resumed = runs
    assert resumed["steps"] == 4 and resumed["resumed_at"] == [2]
    straight, again, two_steps = (
        load_file(root / run / "controlnet" / "diffusion_pytorch_model.safetensors")
        for run in ("straight", "resumed", "evaluated"))
    assert straight.keys() == again.keys()
    assert [k for k in straight if not torch.equal(straight[k], again[k])] == []
    assert any(not torch.equal(straight[k], two_steps[k]) for k in straight)  # steps 3-4 trained


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from cnexp.base import load_base

    cfg = compose_cfg(RUN, out_dir=tmp_path_factory.mktemp("run"))
    return cfg, load_base(cfg.base)


def module_for(sd3, **knobs) -> ControlNetModule:
    cfg, base = sd3
    control_cfg = OmegaConf.merge(cfg.control, {k: v for k, v in knobs.items()
                                                if k in cfg.control})
    optim = OmegaConf.merge(cfg.optim, {k: v for k, v in knobs.items() if k in cfg.optim})
    family = get_family("sd3")
    branch = family.branch(control_cfg.branch)
    control = build_controlnet(family.denoiser(base), control_cfg, branch)
    return ControlNetModule(base, control, optim, branch=branch)


def batch(n=2) -> dict:
    generator = torch.Generator().manual_seed(1)
    return {"image": torch.rand(n, 3, 64, 64, generator=generator) * 2 - 1,
            "condition": torch.rand(n, 3, 64, 64, generator=generator),
            "caption": CAPTIONS[:n]}


@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no_t5"])
def test_prompts_encode_as_diffusers_sd3_pipeline_encodes_them(sd3, t5):
    """With T5, and without (text_encoder_3=None: no rows in its place, as the pipeline makes
    them at the max_sequence_length sampling passes)."""
    _, base = sd3
    family = get_family("sd3")
    if not t5:
        base = dataclasses.replace(base, extra={**base.extra, "text_encoder_3": None,
                                                "tokenizer_3": None})
    parts = family.pipeline_parts(base, base.noise_scheduler)
    del parts["pipeline_class"]
    pipe = StableDiffusion3ControlNetPipeline(transformer=base.unet, controlnet=None, **parts)
    length = get_family("sd3").branch("copy").sampling_inputs(
        pipe, None, 1.0)["max_sequence_length"]
    assert length == (256 if t5 else 0)
    embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, None, None,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=length)
    with torch.no_grad():
        cond = family.conditioning(base, family.encode_text(base, CAPTIONS, "cpu"), None)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond["pooled_projections"], pooled)


def test_the_loss_is_the_scripts_preconditioned_flow_matching(sd3):
    """Logit-normal timesteps on the scheduler's shifted grid, x_s = (1 - s) x + s noise, the
    velocity turned into x_s - s v and compared with x (train_controlnet_sd3.py's defaults)."""
    module, data, family = module_for(sd3), batch(), get_family("sd3")
    base = module.base
    with torch.no_grad():
        loss = module.diffusion_loss(data, torch.Generator().manual_seed(0))
        generator = torch.Generator().manual_seed(0)
        latents = module.encode_images(data["image"], generator)
        text = module.dropped_prompt_embeddings(data["caption"], generator)
        noise = torch.randn(latents.shape, generator=generator)
        u = torch.sigmoid(torch.randn((2,), generator=generator))
        t = base.noise_scheduler.timesteps[(u * 1000).long()]
        s = (t / 1000).view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        v = module.controlled_prediction(noisy, t, text, data["condition"])
    torch.testing.assert_close(loss, F.mse_loss(noisy - s * v, latents))
    assert set(family.spread_timesteps(base, 5, "cpu").tolist()) <= set(
        base.noise_scheduler.timesteps.tolist())


def test_zero_connectors_leave_the_base_exactly_and_gaussian_ones_do_not(sd3):
    zero = base_damage(module_for(sd3), batch())
    gaussian = base_damage(module_for(sd3, connector_init="gaussian"), batch())
    hint = module_for(sd3, connector_init="gaussian", init_scope="connectors_and_hint")
    assert zero == 0.0 < gaussian
    assert torch.count_nonzero(hint.controlnet.pos_embed_input.proj.weight) > 0


def test_copy_starts_as_the_base_scratch_does_not_and_lite_is_smaller(sd3):
    _, base = sd3
    family = get_family("sd3")
    copy, scratch, lite = (module_for(sd3, branch=name) for name in ("copy", "scratch", "lite"))
    pairs = copy.branch.copied_from_base(copy.controlnet, base.unet)
    assert {n.split(".")[0] for n in pairs} == {"pos_embed", "time_text_embed",
                                               "context_embedder", "transformer_blocks"}
    assert all(torch.equal(p, b) for p, b in pairs.values())  # copy drift 0 at start
    assert scratch.branch.copied_from_base(scratch.controlnet, base.unet) == {}
    block = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(dict(scratch.controlnet.named_parameters())[block],
                           dict(base.unet.named_parameters())[block])
    assert len(lite.controlnet.transformer_blocks) == 1 < len(copy.controlnet.transformer_blocks)
    assert count_trainable(lite.controlnet) < count_trainable(copy.controlnet)
    assert base.unet.config.num_layers == 4  # from_transformer did not rewrite the base's config
    for name in ("xs", "t2i_adapter", "lora_copy"):
        with pytest.raises(ConfigError, match=f"{name} does not run on base.family=sd3.*copy, "
                                              "scratch, lite"):
            family.branch(name)
    for knob in ({"sd_locked": False}, {"only_mid_control": True}, {"connector": "cross_norm"}):
        with pytest.raises(ConfigError, match=f"base.family=sd3: control.{next(iter(knob))}"):
            copy.branch.check(OmegaConf.merge(sd3[0].control, knob))


def captured_inputs(module, data) -> dict:
    """The conditioning and the control input the branch received in one training step."""
    seen, predict = {}, module.branch.predict

    def spy(unet, control, noisy, t, cond, condition, scale=1.0):
        seen.update(cond, control_input=condition)
        return predict(unet, control, noisy, t, cond, condition, scale)

    module.branch = type("Spy", (), {"predict": staticmethod(spy)})()
    with torch.no_grad():
        module.diffusion_loss(data, torch.Generator().manual_seed(0))
    return seen


def test_prompt_and_condition_dropout_act_on_every_sd3_input(sd3):
    _, base = sd3
    family, data = get_family("sd3"), batch()
    with torch.no_grad():
        empty = family.conditioning(base, family.encode_text(base, [""] * 2, "cpu"), None)
        own = family.conditioning(base, family.encode_text(base, data["caption"], "cpu"), None)
        black = family.control_input(base, torch.zeros_like(data["condition"]))
        condition = family.control_input(base, data["condition"])
    dropped = captured_inputs(module_for(sd3, prompt_dropout=1.0, condition_dropout=1.0), data)
    kept = captured_inputs(module_for(sd3, prompt_dropout=0.0), data)
    for key in ("encoder_hidden_states", "pooled_projections"):
        torch.testing.assert_close(dropped[key], empty[key])
        torch.testing.assert_close(kept[key], own[key])
        assert not torch.allclose(own[key], empty[key])
    torch.testing.assert_close(dropped["control_input"], black)  # the latents of a black image
    torch.testing.assert_close(kept["control_input"], condition)
    assert not torch.allclose(black, condition)

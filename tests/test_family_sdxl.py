"""The SDXL family (cnexp/families/sdxl.py) on its tiny random bundle (base=tiny_sdxl): a run
trains, evaluates and exports; diffusers' own SDXL ControlNet pipeline loads the export and
samples; a resume continues to identical weights; each axis changes what it says on SDXL."""
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg
from omegaconf import OmegaConf
from safetensors.torch import load_file

from cnexp.errors import ConfigError

SMALL = ["base=tiny_sdxl", "data.train_size=16", "data.val_size=4", "data.test_size=4",
         "data.batch_size=4", "logger.mode=disabled", "logger.csv=false",
         "trainer.enable_progress_bar=false"]
EVALUATED = ["data.eval_size=2", "sampling.steps=2", "eval.prompt_settings=[perfect,none]",
             "eval.curve_images=2"]


def train_run(root: Path, out: Path, *extra) -> dict:
    from cnexp.train import train

    return train(compose_cfg([*SMALL, f"data.root={root / 'data'}", *extra], out_dir=out))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    summary = train_run(root, root / "run", "trainer.max_steps=2", *EVALUATED)
    return root, summary


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(config, base, family) of base=tiny_sdxl."""
    from cnexp.base import load_base
    from cnexp.families.family import get_family

    cfg = compose_cfg([*SMALL, f"data.root={tmp_path_factory.mktemp('data')}"])
    base = load_base(cfg.base)
    return cfg, base, get_family("sdxl")


def module_with(sdxl, **control):
    from cnexp.control import build_controlnet
    from cnexp.module import ControlNetModule

    cfg, base, family = sdxl
    control_cfg = OmegaConf.merge(cfg.control, control)
    branch = family.branch(control_cfg.branch)
    net = build_controlnet(family.denoiser(base), control_cfg, branch)
    return ControlNetModule(base, net, cfg.optim, branch=branch)


def inputs(module, n: int = 2):
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(n, 4, 16, 16, generator=generator)
    t = torch.tensor([100, 700])[:n]
    text = module.encode_prompts(["a red circle", "a blue square"][:n])
    condition = torch.rand(n, 3, 64, 64, generator=generator)
    return noisy, t, text, condition


def test_a_run_trains_evaluates_and_exports(trained):
    root, summary = trained
    assert summary["steps"] == 2 and summary["controlnet_class"] == "ControlNetModel"
    assert summary["base_damage_step0"] == 0.0  # zero connectors: step 0 is the base
    assert {"eval/perfect/shape_iou", "eval/none/fid", "eval/perfect/clip_score"} \
        <= set(summary["final"])
    assert OmegaConf.load(root / "run" / "config.yaml").base.family == "sdxl"


def test_diffusers_sdxl_pipeline_loads_the_export_and_samples(trained):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    root, _ = trained
    bundle = OmegaConf.load(root / "run" / "config.yaml").base.pretrained
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        bundle, controlnet=ControlNetModel.from_pretrained(root / "run" / "controlnet"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", image=torch.rand(1, 3, 64, 64), num_inference_steps=2,
               height=64, width=64, output_type="pt").images
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_a_resumed_run_ends_with_the_uninterrupted_weights(tmp_path):
    whole = tmp_path / "whole"
    train_run(tmp_path, whole, "trainer.max_steps=4", "eval.enabled=false")
    parted = tmp_path / "parted"
    train_run(tmp_path, parted, "trainer.max_steps=2", "eval.enabled=false")
    train_run(tmp_path, parted, "trainer.max_steps=4", "eval.enabled=false", "ckpt_path=last")
    a = load_file(whole / "controlnet" / "diffusion_pytorch_model.safetensors")
    b = load_file(parted / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
@pytest.mark.parametrize("init,damaged", [("zero", False), ("gaussian", True)])
def test_connector_init_is_what_separates_the_step_0_model_from_the_base(sdxl, init, damaged):
    module = module_with(sdxl, connector_init=init)
    noisy, t, text, condition = inputs(module)
    controlled = module.controlled_prediction(noisy, t, text, condition)
    base = module.family.predict(module.base, noisy, t, text)
    assert (not torch.equal(controlled, base)) is damaged


def test_copy_starts_as_the_base_and_scratch_does_not(sdxl):
    copy, scratch = module_with(sdxl, branch="copy"), module_with(sdxl, branch="scratch")
    pairs = copy.branch.copied_from_base(copy.controlnet, copy.unet)
    assert pairs and all(torch.equal(p, w) for p, w in pairs.values())
    assert "add_embedding.linear_1.weight" in pairs  # SDXL's added conditioning is copied too
    unet = dict(scratch.unet.named_parameters())
    own = dict(scratch.controlnet.named_parameters())
    assert not torch.equal(own["down_blocks.1.attentions.0.proj_in.weight"],
                           unet["down_blocks.1.attentions.0.proj_in.weight"])


def test_the_second_text_encoder_moves_with_the_module(sdxl):
    """Lightning moves the module's submodules to the device: text_encoder_2 must be one."""
    module = module_with(sdxl)
    encoder = module.base.extra["text_encoder_2"]
    ids = {id(p) for p in module.parameters()}
    assert all(id(p) in ids for p in encoder.parameters())


def test_lite_trains_fewer_parameters_than_the_copy(sdxl):
    from cnexp.control import count_trainable

    lite, copy = module_with(sdxl, branch="lite"), module_with(sdxl, branch="copy")
    assert 0 < count_trainable(lite.controlnet) < count_trainable(copy.controlnet) / 2


@torch.no_grad()
@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_prompt_dropout_drops_both_encoders_and_the_pooled_embedding_together(sdxl, rate):
    from cnexp.families.family import unpack_text

    module = module_with(sdxl)
    module.optim = OmegaConf.merge(module.optim, {"prompt_dropout": rate})
    captions = ["a red circle", "a blue square"]
    text = module.dropped_prompt_embeddings(captions, torch.Generator().manual_seed(0))
    expected = module.encode_prompts([""] * 2 if rate else captions)
    assert torch.allclose(text, expected, atol=1e-6)  # "" is encoded alone, once
    _, pooled = unpack_text(text, module.family.pooled_dim(module.base))
    ids = module.base.extra["tokenizer_2"]([""] * 2 if rate else captions, padding="max_length",
                                          return_tensors="pt").input_ids
    assert torch.allclose(pooled, module.base.extra["text_encoder_2"](ids)[0])


def test_condition_dropout_zeroes_the_condition(sdxl):
    module = module_with(sdxl)
    module.optim = OmegaConf.merge(module.optim, {"condition_dropout": 1.0})
    dropped = module.drop_conditions(torch.rand(2, 3, 64, 64), torch.Generator().manual_seed(0))
    assert torch.count_nonzero(dropped) == 0


@torch.no_grad()
@pytest.mark.parametrize("knobs", [dict(branch="lora_copy", lora_rank=4, connector_init="gaussian"),
                                   dict(connector="cross_norm", connector_init="default")])
def test_lora_copy_and_cross_norm_run_on_sdxl(sdxl, knobs):
    module = module_with(sdxl, **knobs)
    noisy, t, text, condition = inputs(module)
    out = module.controlled_prediction(noisy, t, text, condition)
    assert out.shape == noisy.shape and torch.isfinite(out).all()
    assert not torch.equal(out, module.family.predict(module.base, noisy, t, text))


@pytest.mark.parametrize("branch", ["xs", "t2i_adapter"])
def test_branches_not_built_for_sdxl_are_refused_by_name(sdxl, branch):
    with pytest.raises(ConfigError, match=f"control.branch={branch} does not run on "
                                          "base.family=sdxl"):
        module_with(sdxl, branch=branch)

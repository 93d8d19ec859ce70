"""The performance levers (issue 7): each knob does what it says and leaves the objective alone."""
import functools
import os
import sys

import pytest
import torch
from omegaconf import OmegaConf

from cnexp.control import build_controlnet
from cnexp.errors import CnexpError
from cnexp.module import ControlNetModule
from cnexp.train import apply_speed_options


def _batch(tiny_data, n=4):
    items = [tiny_data.datasets["train"][i] for i in range(n)]
    return {"condition": torch.stack([x["condition"] for x in items]),
            "image": torch.stack([x["image"] for x in items]),
            "caption": [x["caption"] for x in items]}


def _options(**knobs):
    base = {"tf32": False, "gradient_checkpointing": False, "compile": False}
    return OmegaConf.create({**base, **knobs})


def _loss_and_grads(module, batch):
    module.controlnet.zero_grad()
    loss = module.diffusion_loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.controlnet.parameters()
                           if p.grad is not None]


def test_fused_adamw_is_the_default_and_can_be_turned_off(tiny_cfg, tiny_base):
    module = ControlNetModule(tiny_base, build_controlnet(tiny_base.unet, tiny_cfg.control),
                              tiny_cfg.optim)
    assert module.configure_optimizers().defaults["fused"] is True
    optim = OmegaConf.merge(tiny_cfg.optim, {"fused": False})
    plain = ControlNetModule(tiny_base, module.controlnet, optim)
    assert not plain.configure_optimizers().defaults["fused"]


def test_eight_bit_adam_without_bitsandbytes_names_the_fix(tiny_cfg, tiny_base, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    optim = OmegaConf.merge(tiny_cfg.optim, {"eight_bit": True})
    module = ControlNetModule(tiny_base, build_controlnet(tiny_base.unet, tiny_cfg.control), optim)
    with pytest.raises(CnexpError, match="optim.eight_bit=false"):
        module.configure_optimizers()


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_cfg, tiny_base, tiny_data):
    batch = _batch(tiny_data)
    controlnet = build_controlnet(tiny_base.unet, tiny_cfg.control)
    torch.nn.init.normal_(controlnet.controlnet_mid_block.weight, std=0.01)  # non-zero grads
    module = ControlNetModule(tiny_base, controlnet, tiny_cfg.optim)
    loss, grads = _loss_and_grads(module, batch)
    apply_speed_options(_options(gradient_checkpointing=True), tiny_base, controlnet)
    try:
        assert controlnet.is_gradient_checkpointing and tiny_base.unet.is_gradient_checkpointing
        loss_ckpt, grads_ckpt = _loss_and_grads(module, batch)
    finally:  # the base is shared by the session's tests
        tiny_base.unet.disable_gradient_checkpointing()
    torch.testing.assert_close(loss_ckpt, loss)
    assert len(grads) == len(grads_ckpt) > 0
    for a, b in zip(grads, grads_ckpt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compile_gives_the_same_loss_and_gradients_and_names(tiny_cfg, tiny_base, tiny_data,
                                                             monkeypatch):
    """trainer.compile compiles the training forward (base + control branch): same objective,
    and the ControlNet's parameter names (checkpoints, export) are untouched. Traced by dynamo
    and differentiated by AOTAutograd (backend aot_eager: what cnexp wires up); inductor's code
    generation, torch's own, costs 1-3 min here: CNEXP_TEST_COMPILE_BACKEND=inductor tests it
    too (python -m cnexp.bench --levers compile times it)."""
    backend = os.environ.get("CNEXP_TEST_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    batch = _batch(tiny_data)
    controlnet = build_controlnet(tiny_base.unet, tiny_cfg.control)
    torch.nn.init.normal_(controlnet.controlnet_mid_block.weight, std=0.01)  # non-zero grads
    names = list(controlnet.state_dict())
    eager = ControlNetModule(tiny_base, controlnet, tiny_cfg.optim)
    compiled = ControlNetModule(tiny_base, controlnet, tiny_cfg.optim, compiled=True)
    assert eager.compiled_predict is None and compiled.compiled_predict is not None
    loss, grads = _loss_and_grads(eager, batch)
    loss_c, grads_c = _loss_and_grads(compiled, batch)
    torch.testing.assert_close(loss_c, loss, rtol=1e-4, atol=1e-6)
    assert len(grads) == len(grads_c) > 0
    for a, b in zip(grads, grads_c):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert list(controlnet.state_dict()) == names

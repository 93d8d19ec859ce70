"""control.branch=lora_copy (cnexp/control/lora_copy.py): the trainable copy trained through
rank-`control.lora_rank` adapters; exports a plain ControlNetModel with the adapters merged."""
import torch
from diffusers import ControlNetModel
from omegaconf import OmegaConf
from peft.tuners.lora import LoraLayer
from torch import nn

from arms import train_arm
from cnexp.control import branch_of, build_controlnet, count_trainable
from cnexp.control.lora_copy import copied_layers, merged


def control_cfg(tiny_cfg, **knobs):
    return OmegaConf.merge(tiny_cfg.control, knobs)


def residuals(control, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = (torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([5, 600]),
              torch.randn(2, 77, 64, generator=generator))
    with torch.no_grad():
        down, mid = control(*inputs, controlnet_cond=torch.rand(2, 3, 64, 64, generator=generator),
                            return_dict=False)
    return [*down, mid]


def test_lora_copy_trains_samples_exports_a_plain_controlnet(tmp_path):
    summary, loaded, _ = train_arm(tmp_path, ["+ablation=lora_copy"])
    assert summary["controlnet_class"] == "ControlNetModel"
    assert summary["base_damage_step0"] == 0.0
    plain = ControlNetModel.from_pretrained(tmp_path / "run" / "controlnet")  # what users load
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert not any("lora_" in name for name, _ in plain.named_parameters())
    assert type(loaded) is ControlNetModel


def test_only_the_adapters_and_the_new_parts_train(tiny_cfg, tiny_base):
    unet = tiny_base.unet
    counts = {rank: count_trainable(build_controlnet(unet, control_cfg(
        tiny_cfg, branch="lora_copy", lora_rank=rank))) for rank in (2, 8)}
    control = build_controlnet(unet, control_cfg(tiny_cfg, branch="lora_copy", lora_rank=8))
    assert branch_of(control).name == "lora_copy"
    trainable = {n for n, p in control.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith(("controlnet_cond_embedding", "controlnet_down_blocks",
                                             "controlnet_mid_block")) for n in trainable)
    # each adapted layer adds rank x (fan_in + out): A (r, in[, k, k]) and B (out, r[, 1, 1])
    full = build_controlnet(unet, tiny_cfg.control)
    layers = dict(full.named_modules())
    per_rank = sum((layers[n].weight[0].numel() + layers[n].weight.shape[0])
                   for n in copied_layers(full))
    assert counts[8] - counts[2] == 6 * per_rank
    assert counts[8] < count_trainable(full) / 2


def test_step0_is_the_copy_and_the_merged_export_computes_what_was_trained(tiny_cfg, tiny_base):
    unet = tiny_base.unet
    lora = build_controlnet(unet, control_cfg(tiny_cfg, branch="lora_copy",
                                              connector_init="gaussian"))
    copy = build_controlnet(unet, control_cfg(tiny_cfg, connector_init="gaussian"))
    shared = {n: p for n, p in lora.named_parameters() if "lora_" not in n}
    with torch.no_grad():  # same connectors and embedding: B = 0 leaves the copy's function
        for name, param in copy.named_parameters():
            param.copy_(shared[name.replace(".weight", ".base_layer.weight").replace(
                ".bias", ".base_layer.bias")] if name not in shared else shared[name])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(residuals(lora), residuals(copy)))
    with torch.no_grad():  # as if trained: the adapters' B move off zero
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    moved = residuals(lora)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(moved, residuals(copy)))
    plain = merged(lora)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert isinstance(plain.down_blocks[0].resnets[0].conv1, nn.Conv2d)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(moved, residuals(plain)))

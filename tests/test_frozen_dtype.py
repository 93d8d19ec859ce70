"""trainer.frozen_dtype (issue 12, item 1): the frozen base in the compute dtype; what trains
stays fp32."""
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from cnexp.base import load_base
from cnexp.control import build_controlnet, decoder_parameters
from cnexp.module import ControlNetModule
from cnexp.precision import resolve_frozen_dtype, store_frozen
from cnexp.train import train
from cnexp.validate import ConfigError
from conftest import compose_cfg


def _trainer(**knobs):
    return OmegaConf.create({"frozen_dtype": "auto", "precision": "32-true", "accelerator": "cpu",
                             **knobs})


def test_auto_is_fp32_on_cpu_and_the_mixed_half_on_a_gpu():
    assert resolve_frozen_dtype(_trainer(precision="bf16-mixed")) == torch.float32  # CPU
    assert resolve_frozen_dtype(_trainer()) == torch.float32
    assert resolve_frozen_dtype(_trainer(accelerator="gpu", precision="bf16-mixed")) \
        == torch.bfloat16
    assert resolve_frozen_dtype(_trainer(accelerator="gpu", precision="16-mixed")) == torch.float16
    assert resolve_frozen_dtype(_trainer(accelerator="gpu", precision="32-true")) == torch.float32
    assert resolve_frozen_dtype(_trainer(frozen_dtype="bf16", precision="bf16-mixed")) \
        == torch.bfloat16  # forced, on any device
    assert compose_cfg().trainer.frozen_dtype == "auto"


def test_half_without_its_mixed_precision_names_the_fix():
    with pytest.raises(ConfigError, match="trainer.precision=bf16-mixed"):
        resolve_frozen_dtype(_trainer(frozen_dtype="bf16"))
    with pytest.raises(ConfigError, match="trainer.frozen_dtype='fp8' is unknown"):
        resolve_frozen_dtype(_trainer(frozen_dtype="fp8"))


def test_bf16_base_keeps_the_trained_parts_fp32_and_a_step_runs(tiny_cfg, tiny_data):
    base = load_base(tiny_cfg.base)  # not the session's shared bundle: this one is cast
    control = OmegaConf.merge(tiny_cfg.control, {"sd_locked": False})
    controlnet = build_controlnet(base.unet, control)
    store_frozen((base.unet, base.vae, base.text_encoder, controlnet), torch.bfloat16)
    assert {p.dtype for p in base.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in base.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in controlnet.parameters()} == {torch.float32}
    decoder = {id(p) for p in decoder_parameters(base.unet)}
    for p in base.unet.parameters():  # the unlocked decoder trains: fp32 master weights
        assert p.dtype == (torch.float32 if id(p) in decoder else torch.bfloat16)
    items = [tiny_data.datasets["train"][i] for i in range(2)]  # bf16 on a CPU is slow
    batch = {"condition": torch.stack([x["condition"] for x in items]),
             "image": torch.stack([x["image"] for x in items]),
             "caption": [x["caption"] for x in items]}
    module = ControlNetModule(base, controlnet, tiny_cfg.optim)
    optimizer = module.configure_optimizers()
    torch.nn.init.normal_(controlnet.controlnet_mid_block.weight, std=0.01)  # non-zero grads
    before = controlnet.controlnet_mid_block.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.diffusion_loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert not torch.equal(controlnet.controlnet_mid_block.weight, before)
    assert {p.grad.dtype for p in controlnet.parameters() if p.grad is not None} == {torch.float32}


@pytest.mark.slow
def test_run_with_forced_bf16_exports_fp32_branch_and_mixed_unet(tmp_path):
    """End to end on the CPU (bf16 autocast, ~10x slower than fp32 here): two steps, sd_locked
    =false; the exported UNet holds the bf16 base and the fp32 decoder that trained."""
    cfg = compose_cfg(["data.train_size=8", "data.val_size=4", "data.test_size=4",
                       f"data.root={tmp_path / 'data'}", "data.batch_size=4",
                       "eval.enabled=false", "logger.mode=disabled", "trainer.max_steps=2",
                       "trainer.precision=bf16-mixed", "trainer.frozen_dtype=bf16",
                       "control.sd_locked=false", f"cache.dir={tmp_path / 'cache'}"],
                      out_dir=tmp_path / "run")
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["final_loss"] == summary["final_loss"]  # not NaN
    controlnet = load_file(tmp_path / "run/controlnet/diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in controlnet.values()} == {torch.float32}
    unet = load_file(tmp_path / "run/unet/diffusion_pytorch_model.safetensors")
    assert unet["conv_in.weight"].dtype == torch.bfloat16
    assert unet["conv_out.weight"].dtype == torch.float32
    shards = list((tmp_path / "cache").glob("*/shard-00000.json"))
    assert len(shards) == 1  # the cache filled with the bf16 encoders' outputs

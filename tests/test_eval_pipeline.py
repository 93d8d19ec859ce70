"""One sampling pipeline per run (issue 22 item 6): built at the first evaluation, reused after,
and every evaluation's images bitwise those a newly built pipeline gives."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

import cnexp.metrics.callbacks as callbacks
from cnexp.config import EvalConfig
from cnexp.control import build_controlnet
from cnexp.metrics.callbacks import EvaluationCallback
from cnexp.module import ControlNetModule
from cnexp.sampling import generate, make_pipeline

from conftest import TINY

pytestmark = pytest.mark.skipif(not (TINY / "model_index.json").exists(),
                                reason="needs the tiny world bundle at assets/tinyworld")


def setup(tiny_cfg, tiny_base, tmp_path, monkeypatch, scheduler="dpmsolver", branch="copy"):
    """A module, an evaluation callback over 2 images, and the count of pipelines built."""
    control = OmegaConf.merge(tiny_cfg.control, {"branch": branch})
    module = ControlNetModule(tiny_base, build_controlnet(tiny_base.unet, control),
                              tiny_cfg.optim)
    # a multistep scheduler keeps state between calls: reuse must not leak it
    sampling = OmegaConf.merge(tiny_cfg.sampling, {"scheduler": scheduler, "steps": 3})
    conditions = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    batch = {"condition": conditions, "image": conditions * 2 - 1, "caption": ["a", "b"]}
    cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig()),
                          {"num_images": 2, "curve_images": 2, "fid": False,
                           "clip_score": False})
    callback = EvaluationCallback(batch, sampling, cfg, tmp_path)
    built = []
    monkeypatch.setattr(callbacks, "make_pipeline",
                        lambda *a, **k: built.append(1) or make_pipeline(*a, **k))
    return module, callback, sampling, batch, built


@torch.no_grad()
def train_a_little(module, seed: int) -> None:
    """What an optimizer step does to the branch: its weights change in place."""
    g = torch.Generator().manual_seed(seed)
    for p in module.controlnet.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 1e-3)


def test_one_pipeline_for_every_evaluation_and_the_same_images(
        tiny_cfg, tiny_base, tmp_path, monkeypatch):
    # DPM-Solver++ (multistep) keeps the most state between calls of the three samplers
    module, callback, sampling, batch, built = setup(tiny_cfg, tiny_base, tmp_path,
                                                     monkeypatch, "dpmsolver")
    sampled = []  # what each evaluation generated
    monkeypatch.setattr(callbacks, "generate",
                        lambda *a, **k: sampled.append(generate(*a, **k)) or sampled[-1])
    trainer = SimpleNamespace(global_step=0, global_rank=0, world_size=1, loggers=[],
                              is_global_zero=True)
    for step in range(3):
        trainer.global_step = step
        train_a_little(module, step)
        callback.evaluate(trainer, module, full=False)  # the curve: samples images 0..1
        fresh = generate(make_pipeline(module, sampling, progress=False),
                         batch["condition"], batch["caption"], sampling)
        assert torch.equal(sampled[-1], fresh), f"step {step}: the reused pipeline differs"
    assert len(built) == 1 and len(sampled) == 3 and len(callback.history) == 3


def test_a_reused_pipeline_keeps_the_branchs_own_train_state(
        tiny_cfg, tiny_base, tmp_path, monkeypatch):
    """lite's pipeline wraps the branch (MultiControlNetModel) when it is built; sampling later
    must give the branch back the state it has then, not the state it had then."""
    module, callback, _, batch, built = setup(tiny_cfg, tiny_base, tmp_path, monkeypatch,
                                              "ddim", branch="lite")
    module.controlnet.train()
    callback.sample(module, batch["caption"], 0, 1)
    module.controlnet.eval()
    callback.sample(module, batch["caption"], 0, 1)
    assert not any(m.training for m in module.controlnet.modules())
    module.controlnet.train()
    callback.sample(module, batch["caption"], 0, 1)
    assert all(m.training for m in module.controlnet.modules())
    assert len(built) == 1

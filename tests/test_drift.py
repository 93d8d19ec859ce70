"""Copy drift (cnexp/metrics/drift.py): exactly 0 at step 0 whatever dtype the base is stored in
(issue 22 item 7), the float64 formula's value without a float64 pass over the copy (item 6)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cnexp.metrics.drift as drift_module
from cnexp.base import load_base
from cnexp.control import build_controlnet, get_branch
from cnexp.metrics.drift import CopyDrift, copy_drift
from cnexp.precision import store_frozen

from conftest import TINY, compose_cfg

needs_tiny = pytest.mark.skipif(not (TINY / "model_index.json").exists(),
                                reason="needs the tiny world bundle at assets/tinyworld")


def float64_drift(pairs) -> float:
    """The formula as it was: every tensor of both sides in float64."""
    moved = base = torch.zeros((), dtype=torch.float64)
    for param, start in pairs.values():
        start = start.detach().double()
        moved = moved + (param.detach().double() - start).pow(2).sum()
        base = base + start.pow(2).sum()
    return float(moved.sqrt() / base.sqrt())


def random_pairs(base_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for i, shape in enumerate([(64, 32, 3, 3), (1000,), (128, 128), (7,)]):
        start = (torch.randn(shape, generator=g) * 0.05).to(base_dtype)
        param = start.float() + torch.randn(shape, generator=g) * 1e-3 * (i + 1)
        pairs[f"p{i}"] = (torch.nn.Parameter(param), start)
    return pairs


@needs_tiny
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_copy_drift_is_exactly_zero_at_step_0_with_a_half_base(dtype):
    cfg = compose_cfg()
    base = load_base(cfg.base)  # its own bundle: this one is cast
    branch = get_branch(cfg.control.branch)
    controlnet = build_controlnet(base.unet, cfg.control)
    pairs = branch.copied_from_base(controlnet, base.unet)
    assert len(pairs) > 10
    # train.py's order: the copy is built from the fp32 base, then the base is stored in half
    store_frozen((base.unet, base.vae, base.text_encoder, controlnet), dtype, copies=pairs)
    assert {start.dtype for _, start in pairs.values()} == {dtype}
    assert {param.dtype for param, _ in pairs.values()} == {torch.float32}  # still trains in fp32
    assert copy_drift(pairs) == 0.0 and CopyDrift()(pairs) == 0.0
    assert float64_drift(pairs) == 0.0


def test_drift_matches_the_float64_formula():
    for base_dtype in (torch.float32, torch.bfloat16):
        pairs = random_pairs(base_dtype)
        expected = float64_drift(pairs)
        assert expected > 0
        assert copy_drift(pairs) == pytest.approx(expected, rel=1e-6)
        assert CopyDrift()(pairs) == pytest.approx(expected, rel=1e-6)
    assert copy_drift({}) is None and CopyDrift()({}) is None


class Float64Sizes(TorchDispatchMode):
    """The element count of every float64 tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.sizes.append(t.numel())
        return out


def test_drift_makes_no_float64_tensor_larger_than_one_number_per_parameter():
    pairs = random_pairs()
    with Float64Sizes() as seen:
        copy_drift(pairs)
    assert seen.sizes and max(seen.sizes) <= len(pairs)  # norms per tensor, not weights
    with Float64Sizes() as old:
        float64_drift(pairs)
    assert max(old.sizes) == max(p.numel() for p, _ in pairs.values())  # what it replaces


def test_the_frozen_base_norm_is_taken_once_per_base(monkeypatch):
    calls = []
    real = drift_module.base_sq
    monkeypatch.setattr(drift_module, "base_sq", lambda pairs: calls.append(1) or real(pairs))
    pairs, drift = random_pairs(), CopyDrift()
    first = drift(pairs)
    with torch.no_grad():
        pairs["p0"][0].add_(0.01)  # training moves the copy, not the base
    assert drift(pairs) > first and len(calls) == 1
    with torch.no_grad():
        pairs["p1"][1].mul_(2.0)  # a base written in place: its norm is taken again
    assert drift(pairs) == pytest.approx(float64_drift(pairs), rel=1e-6) and len(calls) == 2


@pytest.mark.slow
@needs_tiny
def test_a_run_with_a_bf16_base_logs_zero_copy_drift_at_step_0(tmp_path):
    """train() end to end, base forced to bf16 on the CPU (slow: bf16 autocast here)."""
    from cnexp.train import train

    cfg = compose_cfg(["data.train_size=8", "data.val_size=4", "data.test_size=4",
                       f"data.root={tmp_path / 'data'}", "data.batch_size=4",
                       "data.eval_size=2", "eval.prompt_settings=[perfect]", "eval.fid=false",
                       "eval.clip_score=false", "sampling.steps=1", "logger.mode=disabled",
                       "trainer.max_steps=1", "trainer.precision=bf16-mixed",
                       "trainer.frozen_dtype=bf16", "export=false",
                       f"cache.dir={tmp_path / 'cache'}"], out_dir=tmp_path / "run")
    history = train(cfg)["history"]
    assert history[0]["step"] == 0 and history[0]["eval/copy_drift"] == 0.0
    assert history[-1]["eval/copy_drift"] > 0

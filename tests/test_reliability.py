"""Resumable data order and numerical guards (signals, resume and the record: test_integrity.py)."""
import pytest
import torch

from cnexp.data.resumable import ResumableShuffleSampler
from cnexp.reliability import NonFiniteError, NonFiniteGuard


def test_resumable_sampler_continues_the_same_order():
    full = ResumableShuffleSampler(10, batch_size=3, seed=5)
    order = [list(full) for _ in range(3)]  # three epochs, 9 samples each (drop_last)
    flat = [i for epoch in order for i in epoch]
    resumed = ResumableShuffleSampler(10, batch_size=3, seed=5, start_batch=4)  # epoch 1, batch 1
    assert list(resumed) + list(resumed) == flat[12:]
    assert order[0] != order[1]


class _Trainer:
    global_step = 7


class _Module:
    def log(self, *args, **kwargs):
        pass


def _optimizer(grad_value):
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), grad_value)
    return torch.optim.AdamW([p]), p


def test_nonfinite_gradient_stops_naming_the_step(tmp_path):
    guard = NonFiniteGuard("stop", tmp_path)
    opt, _ = _optimizer(float("nan"))
    with pytest.raises(NonFiniteError, match="step 7.*last good checkpoint"):
        guard.on_before_optimizer_step(_Trainer(), _Module(), opt)
    with pytest.raises(NonFiniteError, match="loss"):
        guard.on_before_backward(_Trainer(), _Module(), torch.tensor(float("inf")))


def test_nonfinite_gradient_skip_leaves_weights_untouched():
    guard = NonFiniteGuard("skip")
    opt, p = _optimizer(float("inf"))
    guard.on_before_optimizer_step(_Trainer(), _Module(), opt)
    opt.step()
    assert torch.equal(p.data, torch.zeros(3)) and guard.skipped == 1
    opt2, p2 = _optimizer(1.0)  # finite gradients pass through
    guard.on_before_optimizer_step(_Trainer(), _Module(), opt2)
    assert p2.grad is not None


def test_guard_clips_finite_gradients_like_clip_grad_norm():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]  # total norm 13
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    NonFiniteGuard("stop", clip_norm=1.0).on_before_optimizer_step(
        _Trainer(), _Module(), torch.optim.AdamW(params))
    reference = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(reference, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(reference, 1.0)
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.grad, r.grad)
    assert abs(torch.cat([p.grad for p in params]).norm().item() - 1.0) < 1e-5
    small = torch.nn.Parameter(torch.zeros(2))
    small.grad = torch.tensor([0.3, 0.4])  # norm 0.5 < 1: left as is
    NonFiniteGuard("stop", clip_norm=1.0).on_before_optimizer_step(
        _Trainer(), _Module(), torch.optim.AdamW([small]))
    assert torch.equal(small.grad, torch.tensor([0.3, 0.4]))

"""Resumable data order and numerical guards (signals, resume and the record: test_integrity.py)."""
import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from cnexp.data.resumable import ResumableShuffleSampler
from cnexp.finite import NonFiniteError, NonFiniteGuard


def test_resumable_sampler_continues_the_same_order():
    full = ResumableShuffleSampler(10, batch_size=3, seed=5)
    order = [list(full) for _ in range(3)]  # three epochs, 9 samples each (drop_last)
    flat = [i for epoch in order for i in epoch]
    resumed = ResumableShuffleSampler(10, batch_size=3, seed=5, start_batch=4)  # epoch 1, batch 1
    assert list(resumed) + list(resumed) == flat[12:]
    assert order[0] != order[1]


class _Trainer:
    global_step = 7
    max_steps = 100
    log_every_n_steps = 10


class _Module:
    logged: dict = {}

    def log(self, name, value, **kwargs):
        self.logged[name] = value


def _optimizer(grad_value, fused=False):
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), grad_value)
    return torch.optim.AdamW([p], fused=fused or None), p


def test_nonfinite_gradient_stops_naming_the_step(tmp_path):
    guard = NonFiniteGuard("stop", tmp_path)
    opt, _ = _optimizer(float("nan"))  # not fused: decided in the step itself
    with pytest.raises(NonFiniteError, match="step 7.*last good checkpoint"):
        guard.on_before_optimizer_step(_Trainer(), _Module(), opt)
    guard.on_before_backward(_Trainer(), _Module(), torch.tensor(float("inf")))
    opt, _ = _optimizer(1.0)
    with pytest.raises(NonFiniteError, match="loss"):
        guard.on_before_optimizer_step(_Trainer(), _Module(), opt)


def test_nonfinite_gradient_skip_leaves_weights_untouched():
    guard = NonFiniteGuard("skip")
    opt, p = _optimizer(float("inf"))
    guard.on_before_optimizer_step(_Trainer(), _Module(), opt)
    opt.step()
    assert torch.equal(p.data, torch.zeros(3)) and guard.skipped == 1
    opt2, p2 = _optimizer(1.0)  # finite gradients pass through: unchanged, not counted, applied
    guard.on_before_optimizer_step(_Trainer(), _Module(), opt2)
    assert torch.equal(p2.grad, torch.ones(3)) and guard.skipped == 1
    opt2.step()
    assert (p2.data < 0).all()  # AdamW moved each weight against its gradient


def _steps(guard, opt, p, grads, first_step=7):
    """Run guarded fused-AdamW steps with the given gradient values; the guard reads at the
    logging cadence (on_train_batch_end) as in a run."""
    trainer = _Trainer()
    for i, value in enumerate(grads):
        trainer.global_step = first_step + i
        p.grad = torch.full((3,), value)
        guard.on_before_backward(trainer, _Module(), torch.tensor(value).square())
        guard.on_before_optimizer_step(trainer, _Module(), opt)
        opt.step()
        trainer.global_step += 1
        guard.on_train_batch_end(trainer, _Module(), None, None, i)
    return trainer


def test_stop_with_a_fused_optimizer_drops_on_the_device_and_raises_at_the_log_step(tmp_path):
    guard = NonFiniteGuard("stop", tmp_path)
    opt, p = _optimizer(1.0, fused=True)
    _steps(guard, opt, p, [1.0])  # step 7 trains
    trained = p.detach().clone()
    state = {k: v.clone() for k, v in opt.state[p].items()}
    assert not torch.equal(trained, torch.zeros(3))
    _steps(guard, opt, p, [float("nan")], first_step=8)  # 9 steps done: no reading, no raise
    # the last step before the reading (10 steps done) is good, yet dropped too
    with pytest.raises(NonFiniteError, match="non-finite loss at step 8.*last good checkpoint"):
        _steps(guard, opt, p, [1.0], first_step=9)
    assert torch.equal(p.detach(), trained)  # neither step 8 nor step 9 touched the weights
    for key, value in opt.state[p].items():  # nor AdamW's moments and step count
        assert torch.equal(value, state[key]), key


def test_skip_with_a_fused_optimizer_counts_on_the_device_and_reports_at_the_log_step():
    guard = NonFiniteGuard("skip")
    opt, p = _optimizer(1.0, fused=True)
    _Module.logged.clear()
    _steps(guard, opt, p, [float("inf")], first_step=0)  # step 0 dropped
    assert torch.equal(p.detach(), torch.zeros(3)) and opt.state[p]["step"] == 0
    _steps(guard, opt, p, [1.0], first_step=1)  # step 1 trains
    assert not torch.equal(p.detach(), torch.zeros(3)) and opt.state[p]["step"] == 1
    assert guard._skipped_read == 0 and "train/skipped_steps" not in _Module.logged  # no read yet
    _steps(guard, opt, p, [float("nan")] * 2 + [1.0] * 6, first_step=2)  # 10 steps: a reading
    assert guard._skipped_read == 3 and _Module.logged["train/skipped_steps"] == 3
    assert opt.state[p]["step"] == 7 and guard.state_dict() == {"skipped": 3}


class _Scaled(_Trainer):
    def __init__(self, scaler):
        self.precision_plugin = type("Plugin", (), {"scaler": scaler})()


def test_under_a_grad_scaler_the_guard_unscales_before_clipping_and_leaves_overflow_to_it():
    """16-mixed with fused AdamW: Lightning skips unscale_ (the fused step unscales), so the
    guard saw scaled gradients: it clipped them and stopped on the scaler's routine overflow."""
    scale = 2.0 ** 16
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    scaler.scale(torch.ones(()))  # what the backward of a run does first: the scale exists
    true = torch.tensor([0.3, 0.4, 0.0])  # norm 0.5: under clip_norm, left as is
    opt, p = _optimizer(1.0, fused=True)
    p.grad = true * scale
    guard = NonFiniteGuard("stop", clip_norm=1.0)
    guard.on_before_optimizer_step(_Scaled(scaler), _Module(), opt)
    torch.testing.assert_close(p.grad, true)  # unscaled, not clipped
    scaler.step(opt)  # honours the unscale: one AdamW step on the true gradient
    scaler.update()
    assert scaler.get_scale() == scale and not torch.equal(p.detach(), torch.zeros(3))
    before = p.detach().clone()
    p.grad = torch.full((3,), float("inf"))  # an overflow: the scaler's to skip
    guard.on_before_optimizer_step(_Scaled(scaler), _Module(), opt)
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), before) and scaler.get_scale() == scale / 2
    trainer = _Scaled(scaler)
    trainer.global_step = 10
    guard.on_train_batch_end(trainer, _Module(), None, None, 0)  # a reading: nothing to stop


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


class _Linear(L.LightningModule):
    """A tiny regression trained with fused AdamW, as cnexp's module is by default."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 8)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x).float(), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=True)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g))
        return DataLoader(data, batch_size=4)


def test_16_mixed_with_fused_adamw_trains_through_the_scalers_overflows(tmp_path):
    """A real Lightning fit under a GradScaler whose first scales overflow fp16 (as a run's first
    steps routinely do): the scaler skips those steps and lowers its scale; the guard must not
    stop the run (it did: it read the scaled gradients' inf as a NaN run)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24)
    module = _Linear()
    start = module.layer.weight.detach().clone()
    trainer = L.Trainer(accelerator="cpu", max_steps=12, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=4, default_root_dir=tmp_path,
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
                        callbacks=[NonFiniteGuard("stop", clip_norm=1.0)])
    trainer.fit(module)
    assert trainer.global_step == 12
    assert scaler.get_scale() < 2.0 ** 24  # some steps overflowed and were the scaler's to skip
    assert not torch.equal(module.layer.weight.detach(), start)  # the others trained

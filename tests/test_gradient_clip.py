"""trainer.gradient_clip_val acts: train.py hands it to the non-finite guard (Lightning's own
clipping stays off, so the gradient norm is taken once per step), and that guard clips a real
Lightning step to it."""
import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cnexp.train import train
from conftest import compose_cfg


class TrainerBuilt(Exception):
    """Raised by the stand-in Trainer: train() stops where it would start fitting."""


def _guard_train_builds(tiny_cfg, tmp_path, monkeypatch, clip: str):
    seen = {}

    def trainer(**kwargs):
        seen.update(kwargs)
        raise TrainerBuilt

    monkeypatch.setattr(L, "Trainer", trainer)
    cfg = compose_cfg([f"data.root={tiny_cfg.data.root}", "data.train_size=64", "data.val_size=16",
                       "data.test_size=16", "data.batch_size=4", "logger.mode=disabled",
                       "logger.csv=false", "eval.enabled=false",
                       f"trainer.gradient_clip_val={clip}"], out_dir=tmp_path / clip)
    with pytest.raises(TrainerBuilt):
        train(cfg)
    assert seen["gradient_clip_val"] is None  # not clipped twice
    [guard] = [c for c in seen["callbacks"] if type(c).__name__ == "NonFiniteGuard"]
    return guard


class Steep(L.LightningModule):
    """One SGD step (lr 1) on a loss with a large gradient: the update is minus the gradient."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 100.0 * torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(4, 8, generator=g),
                                        10 + torch.randn(4, 1, generator=g)), batch_size=4)


def _step_size(guard, tmp_path) -> float:
    """The norm of one optimizer step's change to the weights, with `guard` in the Trainer."""
    torch.manual_seed(0)
    model = Steep()
    before = torch.cat([p.detach().clone().flatten() for p in model.parameters()])
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
              callbacks=[guard]).fit(model)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return float((after - before).norm())


def test_gradient_clip_val_reaches_the_guard_and_bounds_the_step(tiny_cfg, tmp_path, monkeypatch):
    clipped = _guard_train_builds(tiny_cfg, tmp_path, monkeypatch, "0.25")
    unclipped = _guard_train_builds(tiny_cfg, tmp_path, monkeypatch, "null")
    assert (clipped.clip_norm, unclipped.clip_norm) == (0.25, None)
    monkeypatch.undo()  # the real Trainer again
    free = _step_size(unclipped, tmp_path / "free")
    assert free > 10  # the gradient's norm (lr 1): far above the clip value
    assert _step_size(clipped, tmp_path / "clipped") == pytest.approx(0.25, rel=1e-4)

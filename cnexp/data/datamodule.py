"""LightningDataModule of condition/image/caption triples, with a fixed evaluation set."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from cnexp.config import DataConfig
from cnexp.data.fill50k import Fill50kDataset, read_index
from cnexp.tinyworld.shapes import ensure_tiny_dataset

SPLITS = ("train", "val", "test")


def split_indices(n: int, seed: int, val_fraction: float = 0.05,
                  test_fraction: float = 0.05) -> dict[str, list[int]]:
    """Deterministic train/val/test split of a root that has none (same seed, same split)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val, n_test = max(1, int(n * val_fraction)), max(1, int(n * test_fraction))
    return {"val": sorted(order[:n_val]), "test": sorted(order[n_val:n_val + n_test]),
            "train": sorted(order[n_val + n_test:])}


class TriplesDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.datasets: dict[str, Fill50kDataset] = {}

    def prepare_data(self) -> None:
        if self.cfg.generate_tinyworld:
            ensure_tiny_dataset(Path(self.cfg.root), {"train": self.cfg.train_size,
                                                      "val": self.cfg.val_size,
                                                      "test": self.cfg.test_size})

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        root = Path(self.cfg.root)
        if all((root / s / "prompt.json").exists() for s in SPLITS):
            self.datasets = {s: Fill50kDataset(root / s, self.cfg.resolution) for s in SPLITS}
        else:  # one root, no splits: cut it deterministically
            splits = split_indices(len(read_index(root)), self.seed)
            self.datasets = {s: Fill50kDataset(root, self.cfg.resolution, splits[s]) for s in SPLITS}

    def _loader(self, split: str, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(self.datasets[split], batch_size=batch_size or self.cfg.batch_size,
                          shuffle=shuffle, drop_last=shuffle, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                          generator=torch.Generator().manual_seed(self.seed) if shuffle else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def eval_batch(self) -> dict:
        """The fixed evaluation set: the first `eval_size` validation triples, identical for
        every run, seed and ablation, so comparisons between runs are paired."""
        self.setup()
        val = self.datasets["val"]
        items = [val[i] for i in range(min(self.cfg.eval_size, len(val)))]
        return {"condition": torch.stack([x["condition"] for x in items]),
                "image": torch.stack([x["image"] for x in items]),
                "caption": [x["caption"] for x in items],
                "index": [x["index"] for x in items]}

"""LightningDataModule of condition/image/caption triples, with a fixed evaluation set.

data.layout picks the reader (fill50k, hf, captions); data.annotator, when set, computes every
condition from its image (cached on disk). Splits the source lacks are cut from its train split
with data.split_seed, never the run's seed, so every run and ablation sees the same evaluation set,
and by content group, so no held-out sample is also a training sample. Setup runs the data check
(cnexp/data/check.py) first: it stops before training on data that would make the numbers wrong.
"""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from cnexp.config import DataConfig
from cnexp.data.cache import ConditionCache
from cnexp.data.dataset import TriplesDataset
from cnexp.data.images import DataError
from cnexp.data.layout import SPLITS, open_sources
from cnexp.data.resumable import ResumableShuffleSampler
from cnexp.data.workers import resolve_workers
from cnexp.knobs import Layout
from cnexp.tinyworld.shapes import ensure_tiny_dataset

log = logging.getLogger("cnexp")

LAYOUTS = tuple(Layout)  # data.layout's choices
SHOWN_BAD = 5  # skipped samples listed in the log


class TriplesDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, seed: int = 0, tokenizer=None,
                 prompts: tuple[str, ...] = ()):
        """tokenizer: the base's; given, setup warns once about captions (and `prompts`, the
        evaluation's own) it cannot carry whole (cnexp/data/caption_check.py)."""
        super().__init__()
        self.cfg = cfg
        self.seed = seed  # shuffling and random captions/crops; the split uses cfg.split_seed
        self.tokenizer, self.prompts = tokenizer, tuple(prompts)
        self.datasets: dict[str, TriplesDataset] = {}
        self.conditions: ConditionCache | None = None
        self.data_check: dict = {}  # the data check's counts, for the run's record

    def prepare_data(self) -> None:
        if self.cfg.generate_tinyworld:
            ensure_tiny_dataset(Path(self.cfg.root), {"train": self.cfg.train_size,
                                                      "val": self.cfg.val_size,
                                                      "test": self.cfg.test_size})

    def _condition_cache(self) -> ConditionCache | None:
        if self.cfg.annotator is None:
            return None
        from cnexp.data.annotators import get_annotator

        annotator = get_annotator(self.cfg.annotator, pretrained=self.cfg.annotator_path,
                                  **dict(self.cfg.annotator_params or {}))
        directory = Path(self.cfg.cache_dir) / "conditions" if self.cfg.cache_dir else None
        return ConditionCache(annotator, directory)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        cfg = self.cfg
        sources = open_sources(cfg, cfg.cache_dir)
        self.conditions = self._condition_cache()  # fails here, before training, if unusable
        # every sample read once (cached by the data's fingerprint); missing splits cut from
        # train by content group; stops on what would make the numbers wrong (check.py)
        from cnexp.data.check import check_splits

        checked = check_splits(sources, cfg, cfg.cache_dir)
        for message in checked.warnings:
            rank_zero_only(log.warning)("%s", message)
        sources, indices, self.data_check = checked.sources, checked.indices, checked.summary
        for split in SPLITS:
            dataset = TriplesDataset(sources[split], cfg.resolution, indices[split],
                                     train=split == "train", random_crop=cfg.crop == "random",
                                     conditions=self.conditions)
            self.datasets[split] = self._checked(dataset, split)
        self._fit_to_splits()
        if self.conditions is not None:
            log.info("data: %s", self.conditions.summary())
        if self.tokenizer is not None:
            self._check_captions()

    def _fit_to_splits(self) -> None:
        """data.batch_size and eval_size lowered to their split's size where they ask for more:
        said, and recorded in the config that config.yaml and W&B write (cnexp/validate.py;
        cnexp.plan fits with the same function)."""
        from cnexp.validate import fit_to_splits

        sizes = {split: len(dataset) for split, dataset in self.datasets.items()}
        for warning in fit_to_splits(self.cfg, sizes):
            rank_zero_only(log.warning)("%s", warning)

    def _check_captions(self) -> None:
        """Every caption of every split, read once (no image decoded), checked against the
        base's tokenizer; each problem is one warning with counts and examples."""
        from cnexp.data.caption_check import caption_warnings

        seen, captions = set(), list(self.prompts)
        for dataset in self.datasets.values():
            for index in dataset.indices:
                if (id(dataset.source), index) not in seen:  # splits cut from one source
                    seen.add((id(dataset.source), index))
                    captions += dataset.source.captions(index)
        for message in caption_warnings(self.tokenizer, captions):
            rank_zero_only(log.warning)("%s", message)

    def _checked(self, dataset: TriplesDataset, split: str) -> TriplesDataset:
        """Scan the split to precompute conditions (the data check has already left out, or
        refused, unreadable samples)."""
        cfg = self.cfg
        if self.conditions is not None and cfg.precompute_conditions:
            kept, bad = dataset.scan(cfg.skip_bad_samples)
            if bad:
                log.warning("data: skipped %d unreadable %s sample(s); first: %s", len(bad),
                            split, "; ".join(bad[:SHOWN_BAD]))
            dataset.indices = kept
        if len(dataset) == 0 and split != "test":
            after = " after skipping unreadable samples" if cfg.skip_bad_samples else ""
            raise DataError(f"the {split} split of data.root '{cfg.root}' is empty{after}: "
                            "training needs at least one train and one validation sample; add "
                            "samples or fix the unreadable ones")
        return dataset

    def _on_gpu(self) -> bool:
        """Whether batches go to a GPU: the trainer's device once attached, else CUDA's presence."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def _loader(self, split: str, sampler=None, batch_size: int | None = None) -> DataLoader:
        """data.num_workers=auto: on a GPU workers from the job's CPUs, pinned memory and
        persistent workers; on a CPU none (cnexp/data/workers.py), as before."""
        gpu, trainer = self._on_gpu(), getattr(self, "trainer", None)
        workers = resolve_workers(self.cfg.num_workers, gpu,
                                  trainer.num_devices if trainer is not None else 1)
        return DataLoader(self.datasets[split], batch_size=batch_size or self.cfg.batch_size,
                          sampler=sampler, num_workers=workers, drop_last=sampler is not None,
                          persistent_workers=workers > 0, pin_memory=gpu,
                          # seeds the workers' RNG (random crops, caption picks) per epoch
                          generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        # On resume, Lightning has restored global_step before asking for the loader: start
        # exactly where the interrupted run stopped (a plain loader would restart the epoch).
        trainer = getattr(self, "trainer", None)
        consumed = trainer.global_step * trainer.accumulate_grad_batches if trainer else 0
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        batch = self.cfg.batch_size  # global (fitted to the split in setup): split by rank
        if batch % world:
            raise DataError(f"data.batch_size={batch} is the global batch and must split evenly "
                            f"over the {world} training processes: set data.batch_size to a "
                            f"multiple of {world}")
        sampler = ResumableShuffleSampler(len(self.datasets["train"]), batch, self.seed, consumed,
                                          rank, world)
        # the module's frozen-encoder cache holds every training image's latents (it fills
        # before the first step): the loader then leaves the target images undecoded, and the
        # conditions too where their latents are cached (SD3, Flux)
        cache = getattr(getattr(trainer, "lightning_module", None), "cache", None)
        self.datasets["train"].latents_cached = bool(getattr(cache, "use_latents", False))
        self.datasets["train"].conditions_cached = bool(getattr(cache, "use_conditions", False))
        return self._loader("train", sampler, batch // world)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # sample indices stay host ints (the frozen-encoder cache looks rows up by them): moved
        # to the device with the batch, reading them back in the step would wait for the device
        if isinstance(batch, dict) and torch.is_tensor(batch.get("index")):
            batch["index"] = batch["index"].tolist()
        return batch

    def eval_batch(self) -> dict:
        """The fixed evaluation set: the first `eval_size` validation triples (first caption,
        center crop), identical for every run, seed and ablation, so comparisons are paired."""
        self.setup()
        val = self.datasets["val"]
        items = [val[i] for i in range(self.cfg.eval_size)]  # fitted to the split in setup
        batch = {"condition": torch.stack([x["condition"] for x in items]),
                 "image": torch.stack([x["image"] for x in items]),
                 "caption": [x["caption"] for x in items],
                 "index": [x["index"] for x in items]}
        if items and "outline" in items[0]:  # restyled conditions: fidelity scores the outline
            batch["outline"] = torch.stack([x["outline"] for x in items])
        return batch

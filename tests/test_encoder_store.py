"""The frozen-encoder cache on disk (issue 12, item 2): same values as in memory, resumable fill,
keyed invalidation, concurrent first use."""
import os
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import cnexp.encode_store as store
from cnexp.control import build_controlnet
from cnexp.data.dataset import TriplesDataset
from cnexp.data.fill50k import Fill50kSource
from cnexp.encode_cache import FrozenEncoderCache
from cnexp.encode_store import DiskEncoderCache, tokenizer_digest, weights_digest
from cnexp.module import ControlNetModule
from cnexp.tinyworld.shapes import write_fill50k
from conftest import ROOT

CPU = torch.device("cpu")


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(store, "SHARD_IMAGES", 8)  # 20 images: shards of 8, 8 and 4


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_fill50k(tmp_path_factory.mktemp("fill") / "train", 20, seed=3)


def _dataset(root):
    return TriplesDataset(Fill50kSource(root), 64, train=True)


class Encoders:
    """The tiny base's encoders, counting calls; `fail_at` raises at that image call (a kill)."""

    def __init__(self, base, fail_at=None):
        self.base, self.fail_at, self.image_calls, self.text_calls = base, fail_at, 0, 0

    def images(self, x):
        self.image_calls += 1
        if self.image_calls == self.fail_at:
            raise KeyboardInterrupt("killed mid-fill")
        dist = self.base.vae.encode(x).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1)

    def text(self, prompts):
        self.text_calls += 1
        ids = self.base.tokenizer(prompts, padding="max_length", truncation=True,
                                  max_length=self.base.tokenizer.model_max_length,
                                  return_tensors="pt").input_ids
        return self.base.text_encoder(ids)[0]  # (B, T, D), as the module encodes


def _base_key(base):
    return {"vae": weights_digest(base.vae), "text_encoder": weights_digest(base.text_encoder),
            "tokenizer": tokenizer_digest(base.tokenizer)}


def _disk(root, base, **kwargs):
    return DiskEncoderCache(root, _base_key(base), fill_batch=kwargs.pop("fill_batch", 4), **kwargs)


def _same_values(disk, other, dataset):
    for index in dataset.indices:
        assert torch.equal(disk.stored_moments(index), other.stored_moments(index).cpu())
    captions = other.captions if isinstance(other, DiskEncoderCache) else other.text
    assert set(disk.captions) == set(captions)
    for caption in disk.captions:
        assert torch.equal(disk.stored_text(caption), other.stored_text(caption).cpu())


def test_disk_store_holds_the_memory_stores_values_bitwise(tiny_base, data_root, tmp_path,
                                                           small_shards, capsys):
    dataset = _dataset(data_root)
    memory = FrozenEncoderCache(fill_batch=4)
    encoders = Encoders(tiny_base)
    memory.precompute(dataset, encoders.images, encoders.text, CPU)
    disk = _disk(tmp_path, tiny_base)
    disk.precompute(dataset, encoders.images, encoders.text, CPU, progress=True)
    assert "encoder cache" in capsys.readouterr().err  # the progress bar (tqdm)
    assert len(list(disk.directory.glob("shard-*.json"))) == 3 and "" in disk.captions
    _same_values(disk, memory, dataset)
    # a later run opens the shards, encodes nothing, and reads the same values
    again, calls = _disk(tmp_path, tiny_base), Encoders(tiny_base)
    again.precompute(dataset, calls.images, calls.text, CPU)
    assert again.directory == disk.directory and calls.image_calls == calls.text_calls == 0
    _same_values(again, memory, dataset)
    batch = torch.stack([dataset[i]["image"] for i in range(3)])
    moments = again.moments(calls.images, batch, [0, 5, 19])
    assert again.hits == 3 and calls.image_calls == 0
    assert torch.equal(moments[1], memory.stored_moments(5))


def test_killed_fill_keeps_finished_shards_and_continues(tiny_base, data_root, tmp_path,
                                                         small_shards):
    dataset = _dataset(data_root)
    straight = _disk(tmp_path / "straight", tiny_base)
    straight.precompute(dataset, *_calls(Encoders(tiny_base)), CPU)
    killed = _disk(tmp_path / "killed", tiny_base)
    with pytest.raises(KeyboardInterrupt):  # fill batch 4, shards of 8: the 3rd call is shard 1
        killed.precompute(dataset, *_calls(Encoders(tiny_base, fail_at=3)), CPU)
    directory = killed.directory
    assert (directory / "shard-00000.json").exists()
    assert not (directory / "shard-00001.json").exists() and list(directory.glob("*.tmp"))
    resumed, calls = _disk(tmp_path / "killed", tiny_base), Encoders(tiny_base)
    resumed.precompute(dataset, calls.images, calls.text, CPU)
    assert calls.image_calls == 3  # shard 1 (two calls) and shard 2 (one), not shard 0
    assert not list(directory.glob("*.tmp"))  # the dead filler's temp files are gone
    _same_values(resumed, straight, dataset)


def _calls(encoders):
    return encoders.images, encoders.text


def test_a_change_in_the_key_fills_a_new_directory(tiny_base, tmp_path):
    root = write_fill50k(tmp_path / "data", 6, seed=4)
    dataset = _dataset(root)

    def directory(cache, ds=dataset):
        cache.precompute(ds, *_calls(Encoders(tiny_base)), CPU)
        return cache.directory

    first = directory(_disk(tmp_path / "c", tiny_base))
    assert directory(_disk(tmp_path / "c", tiny_base)) == first
    assert directory(_disk(tmp_path / "c", tiny_base, fill_batch=2)) == first  # not in the key
    assert directory(_disk(tmp_path / "c", tiny_base, latents=False)) != first
    other_base = DiskEncoderCache(tmp_path / "c", {**_base_key(tiny_base), "vae": "other"}, 4)
    assert directory(other_base) != first
    assert directory(_disk(tmp_path / "c", tiny_base), TriplesDataset(Fill50kSource(root), 32)) \
        != first  # another resolution
    time.sleep(0.01)
    Image.new("RGB", (64, 64), (9, 9, 9)).save(root / "target" / "2.png")  # an edited image
    changed = directory(_disk(tmp_path / "c", tiny_base))
    assert changed != first and len(list((tmp_path / "c").iterdir())) == 5


def test_disk_and_memory_stores_give_the_same_losses(tiny_cfg, tiny_base, tiny_data, tmp_path):
    """A few training steps' losses: disk == memory bit for bit; both close to no cache."""
    full = tiny_data.datasets["train"]
    dataset = TriplesDataset(full.source, 64, full.indices[:16], train=True)
    controlnet = build_controlnet(tiny_base.unet, tiny_cfg.control)
    torch.nn.init.normal_(controlnet.controlnet_mid_block.weight, std=0.01)
    modules = {"none": ControlNetModule(tiny_base, controlnet, tiny_cfg.optim),
               "memory": ControlNetModule(tiny_base, controlnet, tiny_cfg.optim,
                                          cache=FrozenEncoderCache(fill_batch=8)),
               "disk": ControlNetModule(tiny_base, controlnet, tiny_cfg.optim,
                                        cache=_disk(tmp_path, tiny_base, fill_batch=8))}
    for module in modules.values():
        module.cache.precompute(dataset, module._vae_moments, module._text_encoder, CPU)
    with torch.no_grad():
        for step in range(3):
            items = [dataset[i] for i in range(4 * step, 4 * step + 4)]
            batch = {"condition": torch.stack([x["condition"] for x in items]),
                     "image": torch.stack([x["image"] for x in items]),
                     "caption": [x["caption"] for x in items],
                     "index": torch.tensor([x["index"] for x in items])}
            losses = {name: m.diffusion_loss(batch, torch.Generator().manual_seed(step))
                      for name, m in modules.items()}
            assert torch.equal(losses["disk"], losses["memory"])
            torch.testing.assert_close(losses["disk"], losses["none"], rtol=1e-5, atol=1e-6)
    assert modules["disk"].cache.hits == 12 and modules["disk"].cache.misses == 0


FILLER = """
import sys, time, torch
from pathlib import Path
from cnexp.data.dataset import TriplesDataset
from cnexp.data.fill50k import Fill50kSource
from cnexp.encode_store import DiskEncoderCache
data, cache_root, go = sys.argv[1:4]
dataset = TriplesDataset(Fill50kSource(data), 64, train=True)
calls = []
def images(x):
    calls.append(len(x))
    time.sleep(0.3)  # a slow encoder: the other process arrives mid-fill
    return torch.cat([x.mean(1, keepdim=True), x.std(1, keepdim=True)], dim=1)
def text(prompts):
    return torch.tensor([[float(len(p)), float(sum(map(ord, p)))] for p in prompts])[:, None]
cache = DiskEncoderCache(cache_root, {"base": "toy"}, fill_batch=4)
print("READY", flush=True)
while not Path(go).exists():
    time.sleep(0.01)
cache.precompute(dataset, images, text, torch.device("cpu"))
print("CALLS", len(calls), "ROWS", len(cache.rows), "CAPTIONS", len(cache.captions), flush=True)
"""


def test_two_processes_filling_at_once_both_succeed(data_root, tmp_path):
    script, go = tmp_path / "filler.py", tmp_path / "go"
    script.write_text(FILLER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(data_root), str(tmp_path / "c"),
                               str(go)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for _ in range(2)]
    for proc in procs:  # both started and built their cache object before either fills
        assert proc.stdout.readline().strip() == "READY"
    go.touch()
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    results = sorted(out.strip().splitlines()[-1] for out in outputs)
    assert results[0].startswith("CALLS 0 ROWS 20"), results  # the second found it filled
    assert results[1].startswith("CALLS 5 ROWS 20"), results  # 20 images, 4 per call
    assert results[0].split()[-1] == results[1].split()[-1]  # same captions
    directory = next((tmp_path / "c").iterdir())
    assert not list(directory.glob("*.tmp"))


def _losses(out):
    import csv
    rows = csv.DictReader((out / "csv" / "metrics.csv").open())
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


@pytest.mark.slow
def test_runs_log_the_same_losses_with_either_store_and_without(tmp_path):
    """train() end to end, 6 steps: disk == memory bitwise (a second disk run reuses the
    shards), and no cache agrees to float rounding."""
    from cnexp.train import train
    from conftest import compose_cfg

    common = ["data.train_size=24", "data.val_size=4", "data.test_size=4", "data.batch_size=4",
              f"data.root={tmp_path / 'data'}", "eval.enabled=false", "logger.mode=disabled",
              "trainer.max_steps=6", "trainer.log_every_n_steps=1", "export=false",
              f"cache.dir={tmp_path / 'encoders'}", "cache.fill_batch=8"]
    runs = {"memory": ["cache.store=memory"], "disk": [], "disk again": [],
            "none": ["cache.latents=false", "cache.text=false"]}
    losses = {}
    for name, extra in runs.items():
        out = tmp_path / name.replace(" ", "_")
        train(compose_cfg([*common, *extra], out_dir=out))
        losses[name] = _losses(out)
    assert len(losses["disk"]) == 6
    assert losses["disk"] == losses["memory"] == losses["disk again"]
    assert losses["none"] == pytest.approx(losses["disk"], rel=1e-4)
    assert len(list((tmp_path / "encoders").iterdir())) == 1  # filled once, then reused


@pytest.mark.slow
def test_sd_preset_with_a_local_base_trains_offline_with_evaluation_off(tmp_path, monkeypatch):
    """base=sd15 names a hub CLIP for evaluation; offline with evaluation off it is not needed."""
    from cnexp.train import train
    from conftest import TINY, compose_cfg

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_cfg(["base=sd15", f"base.pretrained={TINY}", "data=tinyworld",
                       f"data.root={tmp_path / 'data'}", "data.train_size=8", "data.val_size=4",
                       "data.test_size=4", "data.resolution=64", "data.batch_size=4",
                       "control.conditioning_embedding_out_channels=[16,32,64]",
                       "eval.enabled=false", "logger.mode=disabled", "trainer.max_steps=2",
                       f"cache.dir={tmp_path / 'encoders'}"], out_dir=tmp_path / "run")
    assert cfg.base.clip_model == "openai/clip-vit-large-patch14" and cfg.cache.fill_batch == 16
    assert train(cfg)["steps"] == 2

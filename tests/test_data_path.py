"""The data path that feeds a GPU (issue 22, items 3 and 5): no target decoded when its latents
are cached, one read per batch from the disk cache, workers/pinning/persistence by default on a
GPU, and a fill with its own loader that decodes no condition, keyed without its batch, and
that tells a waiting job whom it waits for and how far the fill is."""
import json
import logging
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from filelock import FileLock
from PIL import Image

import cnexp.data.fill50k as fill50k
import cnexp.encode_store as store
from cnexp.config import DataConfig
from cnexp.data.datamodule import TriplesDataModule
from cnexp.data.dataset import TriplesDataset
from cnexp.data.fill50k import Fill50kSource
from cnexp.encode_cache import FrozenEncoderCache
from cnexp.encode_store import DiskEncoderCache
from cnexp.tinyworld.shapes import write_fill50k

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = write_fill50k(tmp_path_factory.mktemp("fill") / "train", 12, seed=5)
    # one sample whose condition is the same frame at half the image's (non-square) size
    Image.new("RGB", (96, 64), (200, 30, 30)).save(root / "target" / "11.png")
    Image.new("RGB", (48, 32), (255, 255, 255)).save(root / "source" / "11.png")
    return root


@pytest.fixture
def decoded(monkeypatch):
    """The origins of every image fill50k decodes ('target' of ..., 'source' of ...)."""
    seen = []

    def spy(path, origin, condition=False):
        seen.append(origin)
        return open_rgb(path, origin, condition)

    open_rgb = fill50k.open_rgb
    monkeypatch.setattr(fill50k, "open_rgb", spy)
    return seen


class ToyEncoders:
    """Cheap stand-ins for the VAE and text encoder, counting calls."""

    def __init__(self):
        self.image_calls = self.text_calls = 0

    def images(self, x):
        self.image_calls += 1
        return torch.cat([x.mean(1, keepdim=True), x.std(1, keepdim=True)], dim=1)

    def text(self, prompts):
        self.text_calls += 1
        return torch.tensor([[float(len(p)), float(sum(map(ord, p)))] for p in prompts])[:, None]


def _fake_trainer(cache):
    return SimpleNamespace(global_step=0, accumulate_grad_batches=1, global_rank=0, world_size=1,
                           num_devices=1, strategy=SimpleNamespace(root_device=CPU),
                           lightning_module=SimpleNamespace(cache=cache))


def test_training_batches_leave_the_target_undecoded_when_latents_are_cached(data_root,
                                                                            decoded):
    data = TriplesDataModule(DataConfig(root=str(data_root), batch_size=12, val_fraction=0.1,
                                        test_fraction=0.0))
    data.setup()
    n = len(data.datasets["train"])
    decoded.clear()
    data.trainer = _fake_trainer(FrozenEncoderCache())  # latents cached
    batch = next(iter(data.train_dataloader()))
    assert not [o for o in decoded if o.startswith("'target'")], decoded
    assert batch["image"].numel() == 0 and len(batch["caption"]) == n
    assert 11 in batch["index"].tolist()  # the sample with the half-size condition
    # the conditions are the pixels an uncached item gets (the half-size one resized alike)
    plain = TriplesDataset(Fill50kSource(data_root), 64, train=True)
    for index, condition in zip(batch["index"].tolist(), batch["condition"]):
        assert torch.equal(condition, plain[index]["condition"])
    # without a latent cache the images are there, as before
    data.trainer = _fake_trainer(FrozenEncoderCache(latents=False))
    assert next(iter(data.train_dataloader()))["image"].shape == (n, 3, 64, 64)


def _filled_disk_cache(root, data_root, **kwargs):
    dataset = TriplesDataset(Fill50kSource(data_root), 64, train=True)
    cache = DiskEncoderCache(root, {"base": "toy"}, **{"fill_batch": 4, **kwargs})
    encoders = ToyEncoders()
    cache.precompute(dataset, encoders.images, encoders.text, CPU)
    return cache, dataset, encoders


def test_a_batch_of_cached_rows_is_one_read_not_one_per_row(data_root, tmp_path, monkeypatch):
    cache, dataset, encoders = _filled_disk_cache(tmp_path, data_root)
    reads = []
    getitem = np.memmap.__getitem__
    monkeypatch.setattr(np.memmap, "__getitem__", lambda a, i: reads.append(i) or getitem(a, i))
    indices = [7, 2, 9, 0, 5, 5, 11, 3]
    moments = cache.moments(encoders.images, torch.empty(8, 0), indices)
    assert len(reads) == 1 and encoders.image_calls == len(range(0, 12, 4))  # no encoding
    captions = [dataset.source.captions(i)[0] for i in indices] + [""]
    text = cache.embeddings(encoders.text, captions, CPU)
    assert len(reads) == 2
    monkeypatch.undo()
    assert torch.equal(moments, torch.stack([cache.stored_moments(i) for i in indices]))
    assert torch.equal(text, torch.stack([cache.stored_text(c) for c in captions]))


def test_gpu_runs_get_workers_pinned_memory_and_persistent_workers_by_default(
        data_root, monkeypatch):
    data = TriplesDataModule(DataConfig(root=str(data_root), batch_size=4))
    data.setup()
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(6)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = data.train_dataloader()
    assert (cpu.num_workers, cpu.pin_memory, cpu.persistent_workers) == (0, False, False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = data.train_dataloader()
    assert (gpu.num_workers, gpu.pin_memory, gpu.persistent_workers) == (5, True, True)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")  # SLURM's grant, not the node's CPUs
    assert data.val_dataloader().num_workers == 2


def test_the_fill_batch_is_not_in_the_cache_key(data_root, tmp_path):
    first, _, _ = _filled_disk_cache(tmp_path, data_root, fill_batch=4)
    again, _, encoders = _filled_disk_cache(tmp_path, data_root, fill_batch=2)
    assert again.directory == first.directory and len(again.rows) == 12
    assert encoders.image_calls == encoders.text_calls == 0  # reused, not refilled


def test_the_fill_decodes_no_condition_and_its_workers_change_no_value(data_root, decoded):
    dataset = TriplesDataset(Fill50kSource(data_root), 64, train=True)
    serial = FrozenEncoderCache(fill_batch=4)  # on a CPU: no workers
    serial.precompute(dataset, ToyEncoders().images, ToyEncoders().text, CPU)
    assert not [o for o in decoded if o.startswith("'source'")]
    assert len([o for o in decoded if o.startswith("'target'")]) == 12
    parallel = FrozenEncoderCache(fill_batch=4, fill_workers=2)
    parallel.precompute(dataset, ToyEncoders().images, ToyEncoders().text, CPU)
    assert serial.latent_moments.keys() == parallel.latent_moments.keys()
    for index, value in serial.latent_moments.items():
        assert torch.equal(value, parallel.latent_moments[index])
        assert torch.equal(value, ToyEncoders().images(dataset[index]["image"][None])[0])
    assert serial.text.keys() == parallel.text.keys()


def test_a_job_waiting_on_anothers_fill_says_whom_and_how_far(data_root, tmp_path, monkeypatch,
                                                              caplog):
    dataset = TriplesDataset(Fill50kSource(data_root), 64, train=True)
    cache = DiskEncoderCache(tmp_path, {"base": "toy"}, fill_batch=4)
    directory = cache.directory_for(dataset, CPU)
    directory.mkdir(parents=True)
    # another job holds the lock and has said who it is and how far it got
    (directory / "filler.json").write_text(json.dumps(
        {"host": "gpu-node-7", "pid": 4242, "since": time.time() - 120, "slurm_job": "991",
         "command": "run.py base=sd15"}))
    (directory / "progress.json").write_text(json.dumps({"done": 300, "total": 1000}))
    holder = FileLock(str(directory / "fill.lock"))
    holder.acquire()
    monkeypatch.setattr(store, "WAIT_LOG_S", 0.05)
    encoders = ToyEncoders()
    waiter = threading.Thread(target=cache.precompute,
                              args=(dataset, encoders.images, encoders.text, CPU))
    with caplog.at_level(logging.INFO, logger="cnexp"):
        waiter.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and \
                sum("waiting for" in r.getMessage() for r in caplog.records) < 2:
            time.sleep(0.02)
        assert encoders.image_calls == 0  # still waiting
        holder.release()
        waiter.join(timeout=60)
    waits = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert len(waits) >= 2  # said again while it waits
    assert "pid 4242 on gpu-node-7" in waits[0] and "SLURM job 991" in waits[0]
    assert "run.py base=sd15" in waits[0] and "300 / 1000 images" in waits[0]
    assert len(cache.rows) == 12  # then it filled the cache itself
    assert json.loads((directory / "progress.json").read_text()) == {"done": 12, "total": 12}


def test_image_size_reads_the_header_as_open_rgb_would_decode(tmp_path):
    from cnexp.data.images import image_size, open_rgb

    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.new("RGB", (40, 20), (1, 2, 3)).save(tmp_path / "turned.jpg", exif=exif)
    Image.new("RGB", (40, 20)).save(tmp_path / "plain.png")
    for name in ("turned.jpg", "plain.png"):
        assert image_size(tmp_path / name, name) == open_rgb(tmp_path / name, name).size
    assert image_size(tmp_path / "turned.jpg", "x") == (20, 40)


def test_the_loader_benchmark_runs_both_paths(capsys, tmp_path):
    from cnexp.bench.loader import main

    main(["--images", "8", "--resolution", "64", "--batch", "4", "--batches", "2",
          "--rounds", "1", "--work", str(tmp_path)])
    out = capsys.readouterr().out
    assert "before" in out and "after0" in out and "after / before:" in out


def test_an_hf_source_also_reads_only_the_condition_when_latents_are_cached(monkeypatch):
    import io

    from datasets import Dataset, Features, Image as HFImage, Value

    import cnexp.data.hf as hf

    def png(colour, size):
        buffer = io.BytesIO()
        Image.new("RGB", size, colour).save(buffer, "PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    table = Dataset.from_dict(
        {"image": [png((9 * i, 0, 0), (48, 32)) for i in range(3)],
         "conditioning_image": [png((0, 40 * i, 0), (24, 16)) for i in range(3)],  # half size
         "text": [f"row {i}" for i in range(3)]},
        features=Features({"image": HFImage(), "conditioning_image": HFImage(),
                           "text": Value("string")}))
    source = hf.HFSource(table, "memory", "train", "image", "conditioning_image", "text")
    plain = [TriplesDataset(source, 16, train=True)[i] for i in range(3)]
    seen = []
    open_rgb = hf.open_rgb
    monkeypatch.setattr(hf, "open_rgb", lambda s, where, condition=False:
                        seen.append(where) or open_rgb(s, where, condition))
    cached = TriplesDataset(source, 16, train=True)
    cached.latents_cached = True
    for i in range(3):
        item = cached[i]
        assert torch.equal(item["condition"], plain[i]["condition"]) and item["image"].numel() == 0
    assert seen and not [w for w in seen if w.endswith("column 'image'")], seen

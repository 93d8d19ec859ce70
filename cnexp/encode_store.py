"""The frozen-encoder cache on disk (cache.store=disk): written once, memory-mapped by every run.

    <cache.dir>/<key>/key.json                what the key is made of (readable)
                      fill.lock               held while a process fills (filelock)
                      shard-00000.json        written last: the shard is complete; rows, captions
                      shard-00000.moments.bin (rows, 2C, h, w) raw, dtype in the json
                      shard-00000.text.bin    (new captions, T, D) raw

The key hashes everything the cached values depend on: the training items (dataset fingerprint:
files, captions, indices, resolution, crop), the frozen VAE's and text encoder's weights and
dtype, the tokenizer, the device type and the fill batch. Change any and a new directory is
filled; the old one stays until deleted. Shards hold whole fill batches of the dataset's order,
so the values are the in-memory store's bit for bit. A killed fill keeps its complete shards and
the next run continues after them; two processes starting together take turns on the lock (the
second finds the shards done), and every file appears by atomic rename under a unique temp name.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cnexp.encode_cache import FrozenEncoderCache, encode_chunk, fill_chunks
from cnexp.fileio import atomic_write, exclusive

log = logging.getLogger("cnexp")
FORMAT = 1  # bump when the layout or the fill order changes
SHARD_IMAGES = 1024  # rows per shard, rounded up to whole fill batches
# numpy has no bfloat16: its bits are stored as uint16 and viewed back
AS_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


def weights_digest(*models) -> str:
    """sha1 of the models' parameters and buffers (names, dtypes, bytes): their content."""
    digest = hashlib.sha1()
    for model in models:
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha1(json.dumps([vocab, tokenizer.model_max_length]).encode()).hexdigest()


class _RawWriter:
    """Appends tensors to a temp file under a unique name; `commit` renames it into place."""

    def __init__(self, path: Path):
        self.path, self.rows, self.shape, self.dtype = path, 0, None, None
        fd, self.tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        self.handle = os.fdopen(fd, "wb")

    def append(self, batch: torch.Tensor) -> None:
        batch = batch.detach().cpu().contiguous()
        self.shape, self.dtype = list(batch.shape[1:]), batch.dtype
        self.handle.write(batch.view(-1).view(torch.uint8).numpy().tobytes())
        self.rows += len(batch)

    def commit(self) -> dict:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "rows": self.rows, "shape": self.shape,
                "dtype": str(self.dtype).removeprefix("torch.")}


def _open_raw(directory: Path, meta: dict | None):
    """The memory-mapped (rows, ...) array a shard's json describes, as (array, torch dtype)."""
    if not meta or not meta["rows"]:
        return None
    dtype = getattr(torch, meta["dtype"])
    array = np.memmap(directory / meta["file"], dtype=AS_NUMPY[dtype], mode="r",
                      shape=(meta["rows"], *meta["shape"]))
    return array, dtype


class DiskEncoderCache(FrozenEncoderCache):
    """FrozenEncoderCache whose filled values live in memory-mapped shards under `root`."""

    def __init__(self, root: str | Path, base_key: dict, latents: bool = True, text: bool = True,
                 fill_batch: int = 64):
        super().__init__(latents, text, fill_batch)
        self.root, self.base_key = Path(root), base_key
        self.directory: Path | None = None
        self.rows: dict[int, tuple[np.ndarray, int, torch.dtype]] = {}  # index -> (array, row)
        self.captions: dict[str, tuple[np.ndarray, int, torch.dtype]] = {}

    def key(self, dataset, device: torch.device) -> dict:
        return {"format": FORMAT, "data": dataset.fingerprint(), **self.base_key,
                "device": device.type, "fill_batch": self.fill_batch,
                "latents": self.use_latents, "text": self.use_text}

    def stored_moments(self, index: int) -> torch.Tensor | None:
        return self._read(self.rows.get(index))

    def stored_text(self, caption: str) -> torch.Tensor | None:
        return self._read(self.captions.get(caption))

    @staticmethod
    def _read(where) -> torch.Tensor | None:
        if where is None:
            return None
        array, row, dtype = where
        return torch.from_numpy(np.array(array[row])).view(dtype)  # one row copied out

    @torch.no_grad()
    def precompute(self, dataset, encode_images, encode_text, device: torch.device,
                   progress: bool = False) -> None:
        """Open the shards of this dataset's key, filling the missing ones first."""
        if not (self.use_latents or self.use_text):
            return
        key = self.key(dataset, device)
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        self.directory = self.root / digest
        self.directory.mkdir(parents=True, exist_ok=True)
        # concurrent first runs: one fills, the others wait and then open what it wrote
        with exclusive(self.directory / "fill", f"filling the encoder cache {self.directory}"):
            self._fill(dataset, key, encode_images, encode_text, device, progress)
        self.hits = self.misses = 0

    def _fill(self, dataset, key, encode_images, encode_text, device, progress: bool) -> None:
        directory = self.directory
        if not (directory / "key.json").exists():
            atomic_write(directory / "key.json", json.dumps(key, indent=1).encode())
        for stale in directory.glob("*.tmp"):  # left by a killed filler (we hold the lock)
            stale.unlink(missing_ok=True)
        per_shard = -(-SHARD_IMAGES // self.fill_batch) * self.fill_batch
        starts = range(0, len(dataset), per_shard)
        done = [i for i, _ in enumerate(starts) if (directory / f"shard-{i:05d}.json").exists()]
        bar = tqdm(total=len(dataset), initial=min(len(done) * per_shard, len(dataset)),
                   desc="encoder cache", unit="img", disable=not progress, leave=False)
        with bar:
            for number, start in enumerate(starts):
                meta_path = directory / f"shard-{number:05d}.json"
                if not meta_path.exists():
                    stop = min(start + per_shard, len(dataset))
                    self._write_shard(dataset, start, stop, meta_path, encode_images,
                                      encode_text, device, bar)
                self._open_shard(meta_path)
        log.info("encoder cache: %d images, %d captions in %s", len(self.rows),
                 len(self.captions), directory)

    def _write_shard(self, dataset, start: int, stop: int, meta_path: Path, encode_images,
                     encode_text, device, bar) -> None:
        stem = meta_path.with_suffix("")
        moments, text = _RawWriter(stem.with_suffix(".moments.bin")), \
            _RawWriter(stem.with_suffix(".text.bin"))
        rows, captions, seen = [], [], set()

        def known(caption: str) -> bool:  # in an earlier shard, or earlier in this one
            return caption in self.captions or caption in seen

        for items, chunk_captions in fill_chunks(dataset, start, stop, self.fill_batch):
            values, new, embeds = encode_chunk(items, chunk_captions, known, encode_images,
                                               encode_text, device, self.use_latents,
                                               self.use_text)
            if values is not None:
                moments.append(values)
            if embeds is not None:
                text.append(embeds)
            rows += [int(x["index"]) for x in items]
            captions += new
            seen.update(new)
            bar.update(len(items))
        meta = {"rows": rows, "captions": captions,
                "moments": moments.commit(), "text": text.commit()}
        atomic_write(meta_path, json.dumps(meta).encode())  # last: the shard is complete

    def _open_shard(self, meta_path: Path) -> None:
        meta = json.loads(meta_path.read_text())
        moments = _open_raw(self.directory, meta["moments"])
        if moments is not None:
            self.rows.update((idx, (moments[0], row, moments[1]))
                             for row, idx in enumerate(meta["rows"]))
        text = _open_raw(self.directory, meta["text"])
        if text is not None:
            self.captions.update((c, (text[0], row, text[1]))
                                 for row, c in enumerate(meta["captions"]))

"""The frozen-encoder cache on disk (cache.store=disk): written once, memory-mapped by every run.

    <cache.dir>/<key>/key.json                what the key is made of (readable)
                      fill.lock               held while a process fills (filelock)
                      filler.json             who holds it: host, pid, command, SLURM job, start
                      progress.json           how far that fill is: images done / total
                      shard-00000.json        written last: the shard is complete; rows, captions
                      shard-00000.moments.bin (rows, 2C, h, w) raw, dtype in the json
                      shard-00000.conditions.bin  the conditions' moments (cache.conditions)
                      shard-00000.text.bin    (new captions, T, D) raw

The key hashes everything the cached values depend on: the training items (dataset fingerprint:
files, captions, indices, resolution, crop), the frozen VAE's and text encoder's weights and
dtype, the tokenizer and the device type. Change any and a new directory is filled; the old one
stays until deleted. The fill batch is not in the key: another cache.fill_batch reuses the shards
(encoders are not batch-invariant to the last bit: docs/gpu.md says what that costs). Shards hold
SHARD_IMAGES images of the dataset's order, in fill batches that never cross a shard, so with a
fill batch dividing SHARD_IMAGES the values are the in-memory store's bit for bit. A killed fill
keeps its complete shards and the next run continues after them; two processes starting together
take turns on the lock (the second finds the shards done, and says meanwhile whom it waits for
and how far that fill is), and every file appears by atomic rename under a unique temp name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
from filelock import Timeout
from tqdm.auto import tqdm

from cnexp.encode_cache import (KINDS, Encoders, FrozenEncoderCache, chunks_of,
                                fill_batches)
from cnexp.fileio import AtomicFile, acquire, atomic_write, atomic_write_json, file_lock

log = logging.getLogger("cnexp")
FORMAT = 2  # bump when the layout or the fill order changes (2: shards of SHARD_IMAGES, fill
#            batch out of the key)
SHARD_IMAGES = 1024  # rows per shard, whatever the fill batch
WAIT_LOG_S = 30.0  # a job waiting on another's fill says how far it is this often
PROGRESS_EVERY_S = 5.0  # the filler writes progress.json at most this often (and per shard)
# each kind's moments in a shard: the json's field, the file's suffix
META = {"images": "moments", "conditions": "conditions"}
SUFFIX = {"images": ".moments.bin", "conditions": ".conditions.bin"}
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
        self.file = AtomicFile(path)
        self.handle = self.file.handle

    def append(self, batch: torch.Tensor) -> None:
        batch = batch.detach().cpu().contiguous()
        self.shape, self.dtype = list(batch.shape[1:]), batch.dtype
        self.handle.write(batch.view(-1).view(torch.uint8).numpy().tobytes())
        self.rows += len(batch)

    def commit(self) -> dict:
        self.file.commit()
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


def _gather(where: list, positions: list[int]) -> torch.Tensor:
    """Rows `where[p]` = (array, row, dtype), stacked in order: one fancy-index read per shard
    array that holds any of them (a batch usually touches one), not one read per row."""
    groups: dict[int, list[int]] = {}
    for p in positions:
        groups.setdefault(id(where[p][0]), []).append(p)
    parts, order = [], []
    for members in groups.values():
        array, _, dtype = where[members[0]]
        rows = np.fromiter((where[p][1] for p in members), dtype=np.int64, count=len(members))
        parts.append(torch.from_numpy(np.ascontiguousarray(array[rows])).view(dtype))
        order += members
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    if order != sorted(order):  # several shards: back to the batch's order
        out = out[torch.tensor(sorted(range(len(order)), key=order.__getitem__))]
    return out


def _holder() -> dict:
    """Who fills: what a waiting job prints about us."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "command": " ".join(sys.argv)[:300]}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def waiting_message(directory: Path) -> str:
    """Whom a job waits for and how far that fill is, from the filler's own files."""
    holder = _read_json(directory / "filler.json")
    progress = _read_json(directory / "progress.json")
    who = "another process (it has not said who yet)"
    if holder:
        minutes = (time.time() - holder.get("since", time.time())) / 60
        job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
        who = (f"pid {holder.get('pid')} on {holder.get('host')}{job}, filling for "
               f"{minutes:.1f} min (command: {holder.get('command')})")
    how_far = "no images encoded yet"
    if progress and progress.get("total"):
        done, total = progress["done"], progress["total"]
        how_far = f"{done} / {total} images encoded ({100 * done / total:.0f}%)"
    return f"encoder cache: waiting for {who} to fill {directory}: {how_far}"


@contextlib.contextmanager
def fill_lock(directory: Path):
    """Hold <directory>/fill.lock; while another process holds it, log whom we wait for and
    how far its fill is every WAIT_LOG_S seconds."""
    lock = file_lock(directory / "fill.lock")
    try:
        acquire(lock, timeout=0)
    except Timeout:
        while True:
            log.info("%s", waiting_message(directory))
            try:
                acquire(lock, timeout=WAIT_LOG_S)
                break
            except Timeout:
                continue
    try:
        yield
    finally:
        lock.release()


class _ProgressFile:
    """progress.json: images done of total, for jobs waiting on the fill (at most every
    PROGRESS_EVERY_S seconds: each write is an fsync)."""

    def __init__(self, path: Path, done: int, total: int):
        self.path, self.done, self.total, self.last = path, done, total, float("-inf")

    def add(self, images: int, force: bool = False) -> None:
        self.done += images
        if force or time.monotonic() - self.last >= PROGRESS_EVERY_S:
            atomic_write_json(self.path, {"done": self.done, "total": self.total})
            self.last = time.monotonic()


class DiskEncoderCache(FrozenEncoderCache):
    """FrozenEncoderCache whose filled values live in memory-mapped shards under `root`."""

    def __init__(self, root: str | Path, base_key: dict, latents: bool = True, text: bool = True,
                 fill_batch: int = 64, fill_workers: int | str = "auto",
                 conditions: bool = False):
        super().__init__(latents, text, fill_batch, fill_workers, conditions)
        self.root, self.base_key = Path(root), base_key
        self.directory: Path | None = None
        # index -> (array, row, dtype), per kind; `rows`: the target images'
        self.row_tables: dict[str, dict[int, tuple[np.ndarray, int, torch.dtype]]] = {
            kind: {} for kind in KINDS}
        self.rows = self.row_tables["images"]
        self.captions: dict[str, tuple[np.ndarray, int, torch.dtype]] = {}

    def key(self, dataset, device: torch.device) -> dict:
        """What the values depend on; not the fill batch (nor the fill's workers). Cached
        conditions enter the key only when asked, so the UNet families' directories stay."""
        return {"format": FORMAT, "data": dataset.fingerprint(), **self.base_key,
                "device": device.type, "latents": self.use_latents, "text": self.use_text,
                **({"conditions": True} if self.use_conditions else {})}

    def directory_for(self, dataset, device: torch.device) -> Path:
        digest = hashlib.sha1(json.dumps(self.key(dataset, device), sort_keys=True).encode())
        return self.root / digest.hexdigest()[:20]

    def stored_moments(self, index: int, kind: str = "images") -> torch.Tensor | None:
        return self._read(self.row_tables[kind].get(index))

    def stored_text(self, caption: str) -> torch.Tensor | None:
        return self._read(self.captions.get(caption))

    def read_moments(self, indices: list[int],
                     kind: str = "images") -> tuple[torch.Tensor | None, list[int]]:
        where = [self.row_tables[kind].get(idx) for idx in indices]
        found = [p for p, w in enumerate(where) if w is not None]
        return (_gather(where, found) if found else None), found

    def read_text(self, captions: list[str]) -> tuple[torch.Tensor | None, list[int]]:
        where = [self.captions.get(c) for c in captions]
        found = [p for p, w in enumerate(where) if w is not None]
        return (_gather(where, found) if found else None), found

    @staticmethod
    def _read(where) -> torch.Tensor | None:
        if where is None:
            return None
        array, row, dtype = where
        return torch.from_numpy(np.array(array[row])).view(dtype)  # one row copied out

    @torch.no_grad()
    def precompute(self, dataset, encode_images, encode_text, device: torch.device,
                   progress: bool = False, encode_conditions=None) -> None:
        """Open the shards of this dataset's key, filling the missing ones first."""
        if not self.wants_fill():
            return
        key = self.key(dataset, device)
        self.directory = self.directory_for(dataset, device)
        self.directory.mkdir(parents=True, exist_ok=True)
        encoders = Encoders(encode_images, encode_text, encode_conditions)
        # concurrent first runs: one fills, the others wait (saying for whom) and then open it
        with fill_lock(self.directory):
            self._fill(dataset, key, encoders, device, progress)
        self.hits = self.misses = 0

    def _fill(self, dataset, key, encoders: Encoders, device, progress: bool) -> None:
        directory = self.directory
        if not (directory / "key.json").exists():
            atomic_write(directory / "key.json", json.dumps(key, indent=1).encode())
        for stale in directory.glob("*.tmp"):  # left by a killed filler (we hold the lock)
            stale.unlink(missing_ok=True)
        starts = range(0, len(dataset), SHARD_IMAGES)
        metas = [directory / f"shard-{i:05d}.json" for i, _ in enumerate(starts)]
        spans = {m: (s, min(s + SHARD_IMAGES, len(dataset))) for m, s in zip(metas, starts)
                 if not m.exists()}
        done = len(dataset) - sum(hi - lo for lo, hi in spans.values())
        bar = tqdm(total=len(dataset), initial=done, desc="encoder cache", unit="img",
                   disable=not progress or not spans, leave=False)
        progress_file = _ProgressFile(directory / "progress.json", done, len(dataset))
        if spans:
            atomic_write_json(directory / "filler.json", _holder())
            progress_file.add(0, force=True)
        # the missing shards' fill batches, read through one loader (workers on a GPU)
        chunks = {m: chunks_of(lo, hi, self.fill_batch) for m, (lo, hi) in spans.items()}
        batches = fill_batches(dataset, [c for cs in chunks.values() for c in cs],
                               **self.fill_loader_args(device))
        with bar:
            for meta_path in metas:
                if meta_path in spans:
                    self._write_shard(batches, len(chunks[meta_path]), meta_path, encoders,
                                      device, bar, progress_file)
                    progress_file.add(0, force=True)
                self._open_shard(meta_path)
        log.info("encoder cache: %d images, %d captions in %s", len(self.rows),
                 len(self.captions), directory)

    def _write_shard(self, batches, n_chunks: int, meta_path: Path, encoders: Encoders,
                     device, bar, progress: "_ProgressFile") -> None:
        stem = meta_path.with_suffix("")
        # the images' file always (an empty one when not cached: the layout before conditions)
        writers = {kind: _RawWriter(stem.with_suffix(SUFFIX[kind])) for kind in KINDS
                   if kind == "images" or self.caches(kind)}
        text = _RawWriter(stem.with_suffix(".text.bin"))
        rows, captions, seen = [], [], set()

        def known(caption: str) -> bool:  # in an earlier shard, or earlier in this one
            return caption in self.captions or caption in seen

        for _ in range(n_chunks):
            chunk = next(batches)
            encoded = self.encode(chunk, known, encoders, device)
            for kind, values in encoded.moments.items():
                if values is not None:
                    writers[kind].append(values)
            if encoded.embeddings is not None:
                text.append(encoded.embeddings)
            rows += chunk.indices
            captions += encoded.new
            seen.update(encoded.new)
            bar.update(len(chunk.indices))
            progress.add(len(chunk.indices))
        meta = {"rows": rows, "captions": captions, "text": text.commit(),
                **{META[kind]: writer.commit() for kind, writer in writers.items()}}
        atomic_write(meta_path, json.dumps(meta).encode())  # last: the shard is complete

    def _open_shard(self, meta_path: Path) -> None:
        meta = json.loads(meta_path.read_text())
        for kind in KINDS:
            moments = _open_raw(self.directory, meta.get(META[kind]))
            if moments is not None:
                self.row_tables[kind].update((idx, (moments[0], row, moments[1]))
                                             for row, idx in enumerate(meta["rows"]))
        text = _open_raw(self.directory, meta["text"])
        if text is not None:
            self.captions.update((c, (text[0], row, text[1]))
                                 for row, c in enumerate(meta["captions"]))

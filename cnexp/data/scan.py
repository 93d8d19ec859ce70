"""What the data check knows of each sample: read once, cached by the data's fingerprint.

Each sample is decoded exactly as training decodes it (the layout's `load`,
cnexp/data/images.py's `to_rgb`), so the content hash is of the pixels training sees: the same
picture stored twice under other names, or once as PNG and once as a palette PNG, has one hash.
The same pass reads each sample's look (perceptual hashes, cnexp/data/near_duplicates.py) for
near-duplicates. The cache file is keyed by the source's fingerprint (index bytes, every image
file's size and mtime), so a repeat run reads a few MB of JSON instead of decoding the data set
again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cnexp.data.images import DataError, UnreadableImage, match_sizes
from cnexp.data.near_duplicates import look
from cnexp.fileio import atomic_write_json

log = logging.getLogger("cnexp")

SCAN_VERSION = 3  # bump when Facts or the hash changes: older cache files are then ignored
# Pillow mode -> what it stores, for the report's modes line (describe_modes)
BITS = {"1": "1-bit", "L": "8-bit grey", "LA": "8-bit grey+alpha", "P": "8-bit palette",
        "PA": "8-bit palette+alpha", "RGB": "8-bit RGB", "RGBA": "8-bit RGBA",
        "CMYK": "8-bit CMYK", "YCbCr": "8-bit YCbCr", "I;16": "16-bit grey",
        "I;16B": "16-bit grey", "I;16L": "16-bit grey", "I": "32-bit integer",
        "F": "32-bit float"}
PARALLEL_FROM = 2048  # samples; below it a process pool's start costs more than it saves
CHUNK = 512  # samples per task of the pool


@dataclass
class Facts:
    """One sample as the check sees it."""
    name: str  # its file (and index line), for messages
    content: str = ""  # hash of the decoded target (and condition); "" when unreadable
    size: tuple[int, int] = (0, 0)  # the target's (width, height) as decoded
    condition_size: tuple[int, int] = (0, 0)  # the stored condition's; (0, 0) without one
    modes: list[str] = field(default_factory=list)  # Pillow modes as stored: target[, condition]
    captions: list[str] = field(default_factory=list)
    entry: str = ""  # the files the index names ("" for rows without files: hf)
    error: str = ""  # why it cannot be used as it is; "" when it can
    unreadable: bool = False  # a missing or corrupt file (data.skip_bad_samples may skip it)
    look: str = ""  # perceptual hashes and mean colour (near_duplicates.look); "" unreadable

    @property
    def captionless(self) -> bool:
        """No caption with a word in it: whitespace tokenizes to nothing, like ""."""
        return not any(c.strip() for c in self.captions)


def describe_modes(counts) -> str:
    """Pillow modes met, with their bit depth, most common first (the report's modes line)."""
    return ", ".join(f"{mode} ({BITS.get(mode, '?')}) {n}" for mode, n in counts.most_common())


def sample_name(source, index: int) -> str:
    name = getattr(source, "name", None)
    return name(index) if name is not None else f"sample {index}"


def _digest(img) -> bytes:
    return hashlib.blake2b(f"{img.size}".encode() + img.tobytes(), digest_size=12).digest()


def read_facts(source, index: int) -> Facts:
    """Facts of one sample; never raises for a bad sample (the check decides what it means)."""
    files = getattr(source, "files", None)
    facts = Facts(sample_name(source, index), entry="|".join(files(index)) if files else "")
    try:
        sample = source.load(index)
        facts.captions = list(sample.captions)
        image, condition = sample.image, sample.condition
        facts.size = image.size
        facts.modes = [image.info.get("cnexp_mode", image.mode)]
        digest = _digest(image)
        if condition is not None:
            facts.modes.append(condition.info.get("cnexp_mode", condition.mode))
            match_sizes(image, condition, sample.origin)  # raises if they cannot be aligned
            digest += _digest(condition)
            facts.condition_size = condition.size
        facts.content = hashlib.blake2b(digest, digest_size=12).hexdigest()
        facts.look = look(image, condition)
    except UnreadableImage as err:
        facts.error, facts.unreadable = str(err), True
    except DataError as err:
        facts.error = str(err)
    if not facts.captions and not facts.error:
        facts.captions = [""]
    return facts


def _fingerprint(source) -> str:
    """What the facts depend on: the content fingerprint when the layout has one (it also
    covers condition files, which its encoder-cache fingerprint leaves out)."""
    of = getattr(source, "content_fingerprint", None) or source.fingerprint
    return of()


def scan(source, cache_dir: str | None = None) -> tuple[list[Facts], bool]:
    """Facts of every sample of `source` (in index order) and whether they came from the cache."""
    path = None
    if cache_dir:
        key = hashlib.sha1(json.dumps([SCAN_VERSION, type(source).__name__, len(source),
                                       getattr(source, "with_condition", None),
                                       _fingerprint(source)]).encode()).hexdigest()
        path = Path(cache_dir) / "check" / f"{key}.json"
        cached = _load(path, len(source))
        if cached is not None:
            return cached, True
    facts = read_all(source)
    if path is not None:
        try:
            atomic_write_json(path, [asdict(f) for f in facts])
        except OSError as err:  # a read-only cache: the check still ran, it just is not kept
            log.warning("data check: could not cache its scan in %s (%s)", path, err)
    return facts, False


_SOURCE = None  # the source a forked worker reads (inherited, never pickled)


def _read_range(bounds: tuple[int, int]) -> list[Facts]:
    return [read_facts(_SOURCE, index) for index in range(*bounds)]


def read_all(source) -> list[Facts]:
    """Facts of every sample, in index order; decoded by forked processes (one per core, up
    to 8) for a large source: 50k samples are then a minute or less, not several."""
    global _SOURCE
    n = len(source)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if n < PARALLEL_FROM or cores < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [read_facts(source, index) for index in range(n)]
    _SOURCE = source
    try:
        with ProcessPoolExecutor(min(cores, 8), mp_context=multiprocessing.get_context("fork")
                                 ) as pool:
            chunks = pool.map(_read_range, [(s, min(n, s + CHUNK)) for s in range(0, n, CHUNK)])
            return [facts for chunk in chunks for facts in chunk]
    finally:
        _SOURCE = None


def _load(path: Path, n: int) -> list[Facts] | None:
    try:
        rows = json.loads(path.read_text())
        facts = [Facts(**{**row, "size": tuple(row["size"]),
                          "condition_size": tuple(row["condition_size"])}) for row in rows]
    except (OSError, ValueError, TypeError, KeyError):
        return None  # absent, or written by another version: scan again
    return facts if len(facts) == n else None

"""Near-duplicates: samples that are another's picture re-saved (JPEG), resized or re-encoded.

The content hash (cnexp/data/scan.py) catches only pixel-identical copies; a held-out sample that
is a training sample saved as JPEG q90, or resized by one pixel, has other pixels and leaks all
the same. Each sample's *look* is read in the pass that decodes it (and cached with its facts):

- a 256-bit perceptual hash (imagehash's pHash, hash_size 16) of the decoded target and one of the
  condition (when the data has one): the signs of a 64x64 grey image's low DCT frequencies,
  which re-encoding and small resizes barely move;
- the target's mean colour: pHash reads grey only, so a red circle on yellow and a blue circle
  on red at the same place hash alike; a re-save keeps the mean within a level or two.

Two samples are near-duplicates when both hashes are within data.near_duplicate_distance bits
and the mean colours within COLOUR_TOLERANCE levels per channel. docs/data.md gives the measured
distances behind the default (re-saves vs distinct tiny-world and fill50k samples) and the cost.
"""
from __future__ import annotations

from collections import defaultdict
from itertools import product

import numpy as np
from PIL import Image, ImageStat

HASH_SIZE = 16  # bits per side: 16x16 = 256-bit hashes
HASHED_SIDE = HASH_SIZE * 4  # pHash reads a 64x64 grey image (imagehash's highfreq_factor 4)
COLOUR_TOLERANCE = 6  # mean-colour levels per channel (of 255): a re-save moves it 0-2
FLAT_STD = 2.0  # a target whose every channel varies less (levels of 255) is one flat colour
HEX = HASH_SIZE * HASH_SIZE // 4  # hex digits per hash


def _small(img: Image.Image) -> Image.Image:
    """What pHash reads: an image of 128 px or more area-averaged to 64x64 first (pHash's own
    antialiased resize of 512 px is the slow part; a box filter takes a 1-pixel size change
    evenly, where Pillow's reducing_gap shortcut does not)."""
    if min(img.size) >= 2 * HASHED_SIDE:
        return img.resize((HASHED_SIDE, HASHED_SIDE), Image.BOX)
    return img


def _phash(img: Image.Image) -> str:
    import imagehash

    bits = imagehash.phash(img.convert("L"), hash_size=HASH_SIZE).hash
    return np.packbits(bits).tobytes().hex()  # str(hash) is the same hex, slower


def look(image: Image.Image, condition: Image.Image | None) -> str:
    """The sample's look as hex: target hash, condition hash ("" without one), mean colour;
    "" for a target of one flat colour (no picture for pHash to read: its hash is the same for
    every flat image, so those are compared pixel for pixel only, by the content hash)."""
    small = _small(image)
    stat = ImageStat.Stat(small)  # per channel, in C (numpy's std of 64x64x3 is slower)
    if max(stat.stddev) < FLAT_STD:
        return ""
    colour = "".join(f"{round(c):02x}" for c in stat.mean)
    return _phash(small) + (_phash(_small(condition)) if condition is not None else "") + colour


def _parse(looks: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(n, words) uint64 hash words (target, then condition) and (n, 3) mean colours."""
    words = [[int(s[k:k + 16], 16) for k in range(0, len(s) - 6, 16)] for s in looks]
    width = max(map(len, words), default=0)
    hashes = np.array([w + [0] * (width - len(w)) for w in words], dtype=np.uint64)
    colours = np.array([[int(s[-6:][k:k + 2], 16) for k in (0, 2, 4)] for s in looks],
                       dtype=np.int16).reshape(-1, 3)
    return hashes.reshape(len(looks), -1), colours


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits per uint64 (numpy >= 2 has it built in; older numpy counts unpacked bytes)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words)
    return np.unpackbits(words.view(np.uint8).reshape(*words.shape, 8), axis=-1).sum(-1)


def _distances(hashes: np.ndarray, i: int, others: np.ndarray) -> np.ndarray:
    """max(target distance, condition distance) from sample i to each of `others`."""
    per_word = _popcount(hashes[others] ^ hashes[i])  # (k, words)
    half = HEX // 16  # words per hash
    target = per_word[:, :half].sum(1)
    return np.maximum(target, per_word[:, half:].sum(1)) if per_word.shape[1] > half else target


def near_pairs(looks: list[str], max_distance: int,
               sides: list[int] | None = None) -> list[tuple[int, int, int]]:
    """(i, j, distance) for every near-duplicate pair i < j among `looks` ("": unreadable or
    flat, never paired). With `sides`, only pairs whose sides differ (held-out against train).
    Candidates come from buckets of mean colour, so the cost follows the pairs of like colour,
    not n^2."""
    known = [i for i, s in enumerate(looks) if s]
    if len(known) < 2:
        return []
    hashes, colours = _parse([looks[i] for i in known])
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for row, colour in enumerate(colours // (COLOUR_TOLERANCE + 1)):
        buckets[tuple(colour.tolist())].append(row)
    side = np.array([sides[i] for i in known]) if sides is not None else None
    pairs = []
    for key, rows in buckets.items():
        near = [r for step in product((-1, 0, 1), repeat=3)
                for r in buckets.get(tuple(k + s for k, s in zip(key, step)), ())]
        others = np.array(sorted(near))
        for row in rows:
            cand = others[others > row]
            cand = cand[np.abs(colours[cand] - colours[row]).max(1) <= COLOUR_TOLERANCE]
            if side is not None:
                cand = cand[side[cand] != side[row]]
            if len(cand) == 0:
                continue
            dist = _distances(hashes, row, cand)
            close = dist <= max_distance  # filtered in numpy: a crowded bucket is n^2 / 2 pairs
            pairs += [(known[row], known[c], int(d)) for c, d in zip(cand[close], dist[close])]
    return sorted(pairs)


def merge(groups: list[list[int]], pairs: list[tuple[int, int, int]]) -> list[list[int]]:
    """Content groups joined wherever a near pair links two of them (union-find), so a cut
    split keeps each near-duplicate family on one side; unlinked groups come back as they were."""
    owner = {i: g for g, members in enumerate(groups) for i in members}
    parent = list(range(len(groups)))

    def root(g: int) -> int:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    for i, j, _ in pairs:
        a, b = root(owner[i]), root(owner[j])
        if a != b:
            parent[max(a, b)] = min(a, b)
    joined: dict[int, list[int]] = defaultdict(list)
    for g, members in enumerate(groups):
        joined[root(g)] += members
    return [sorted(members) for members in joined.values()]


def across_sources(entries: list, fact, source_of, max_distance: int) -> list[tuple]:
    """(a, b, distance) for near-duplicate entries of different sources (given splits: held-out
    against train; splits cut from one source are kept apart by merge instead), leaving out
    pixel-identical pairs, which the exact check already counts."""
    sides: dict[int, int] = {}
    side = [sides.setdefault(id(source_of(e)), len(sides)) for e in entries]
    if len(sides) < 2:
        return []
    pairs = near_pairs([fact(e).look for e in entries], max_distance, side)
    return [(entries[i], entries[j], d) for i, j, d in pairs
            if fact(entries[i]).content != fact(entries[j]).content]


def leak_message(pairs: list[tuple], fact, max_distance: int, shown: int = 3) -> str:
    """The refusal for near-duplicates across given splits, naming the first pairs."""
    named = "; ".join(f"{fact(a).name} ~ {fact(b).name} ({d} bits)" for a, b, d in pairs[:shown])
    more = f"; ... ({len(pairs) - shown} more)" if len(pairs) > shown else ""
    return (f"{len(pairs)} pair(s) of samples on both sides of the given splits are "
            "near-duplicates (a re-saved or resized copy: both perceptual hashes within "
            f"data.near_duplicate_distance={max_distance} of 256 bits, mean colours alike): a "
            "held-out sample that is a copy of a training sample measures memorisation, not "
            f"generalisation; e.g. {named}{more}. Fix: remove one side's copy, or set "
            "data.duplicates=drop (the held-out copy is kept, the training copy left out); "
            "data.near_duplicate_distance=null checks exact copies only")


def drop_message(pairs: list[tuple], fact, max_distance: int, dropped: int,
                 shown: int = 3) -> str:
    """The warning for data.duplicates=drop over near-duplicates across given splits."""
    named = "; ".join(f"{fact(a).name} ~ {fact(b).name} ({d} bits)" for a, b, d in pairs[:shown])
    return (f"data: left out {dropped} training sample(s) that are near-duplicates of held-out "
            f"ones ({len(pairs)} pair(s) within data.near_duplicate_distance={max_distance} of "
            f"256 bits; data.duplicates=drop keeps the held-out copy); e.g. {named}")

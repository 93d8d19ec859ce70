"""The data check: what would make a run's numbers wrong, found before training.

    python -m cnexp.data.check [the overrides run.py takes]      # e.g. data=fill50k data.root=..

prints a report: samples per split, image modes and sizes, duplicates (by a hash of the decoded
condition and target, not by file name; near-duplicates by perceptual hashes,
cnexp/data/near_duplicates.py), captions, unreadable files. Every training run runs the same
check in its data module's setup (cached by the data's fingerprint: a repeat only reads the
cache) and stops with one message naming the samples and the fix on what would make its numbers
wrong: a held-out sample that is also a training sample (or a re-saved, resized copy of one), an
unreadable file, a target or condition far below the training resolution, a target with an
extreme aspect ratio, duplicates nobody decided about (data.duplicates). What is merely unusual
(upscaled images, empty captions, duplicates dropped or kept) is a warning with counts.
docs/data.md shows the report and its time.
"""
from __future__ import annotations

import functools
import logging
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace

from omegaconf import DictConfig, OmegaConf

from cnexp.data.images import DataError
from cnexp.data.near_duplicates import (across_sources, drop_message, leak_message, merge,
                                         near_pairs)
from cnexp.data.scan import Facts, describe_modes, scan
from cnexp.data.splits import keep_families_together, split_groups, too_small

log = logging.getLogger("cnexp")

SPLITS = ("train", "val", "test")
KEEP_FIRST = ("val", "test", "train")  # data.duplicates=drop keeps a held-out copy first
SHOWN = 5  # samples named per problem


def _errors(entries: list, facts) -> str:
    """The first one's message in full (it says what and why), then the others' heads
    ("image file X is missing": the file that failed, which may be the condition)."""
    first, rest = facts(entries[0]).error, entries[1:]
    heads = "; ".join(facts(e).error.split(" (")[0][:160] for e in rest[:SHOWN])
    more = f"; ... ({len(rest) - SHOWN} more)" if len(rest) > SHOWN else ""
    return first + (f" | also: {heads}{more}" if rest else "")


def _names(entries: list, facts, shown: int = SHOWN) -> str:
    listed = "; ".join(facts(e).name for e in entries[:shown])
    return listed + (f"; ... ({len(entries) - shown} more)" if len(entries) > shown else "")


@dataclass
class Checked:
    """What setup trains and evaluates on, and what the record and the report say of it."""
    sources: dict
    indices: dict[str, list[int]]
    summary: dict = field(default_factory=dict)  # the run record's data-check fields
    warnings: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)  # non-empty: training must not start
    report: list[str] = field(default_factory=list)

    def raise_if_refused(self) -> None:
        if self.refusals:
            raise DataError("data check: this data would make the run's numbers wrong, so "
                            "training does not start (`python -m cnexp.data.check` with the same "
                            "overrides prints the full report):\n  " + "\n  ".join(self.refusals))


class DataCheck:
    """Reads every sample once (cnexp/data/scan.py), cuts the splits the source lacks by content
    group, and sorts what it found into refusals and warnings."""

    def __init__(self, sources: dict, cfg, cache_dir: str | None = None):
        if isinstance(cfg, DictConfig):  # a plain copy: OmegaConf's attribute access is slow
            cfg = SimpleNamespace(**OmegaConf.to_container(cfg, resolve=True))  # in loops
        self.cfg, start = cfg, time.perf_counter()
        self.facts: dict[int, list[Facts]] = {}
        cached = True
        for source in sources.values():
            if id(source) not in self.facts:
                self.facts[id(source)], hit = scan(source, cache_dir)
                cached = cached and hit
        self.seconds, self.cached = time.perf_counter() - start, cached
        self.sources, self.missing = dict(sources), [s for s in SPLITS if s not in sources]
        self.too_small: str = ""  # a source too small to cut the missing splits from
        self.near_joined = 0  # content groups a cut joined to another as near-duplicates
        self.indices = self._split()

    def fact(self, entry: tuple[str, int]) -> Facts:
        split, index = entry
        return self.facts[id(self.sources[split])][index]

    def _split(self) -> dict[str, list[int]]:
        """Given splits as they are; missing ones cut from train by content group."""
        indices = {s: list(range(len(src))) for s, src in self.sources.items()}
        if not self.missing:
            return indices
        cfg, train = self.cfg, self.sources["train"]
        groups: dict[str, list[int]] = defaultdict(list)
        for index, facts in enumerate(self.facts[id(train)]):
            groups[facts.content or f"unreadable {index}"].append(index)  # unreadable: alone
        near = ([] if cfg.near_duplicate_distance is None else
                near_pairs([f.look for f in self.facts[id(train)]], cfg.near_duplicate_distance))
        joined = merge(list(groups.values()), near)  # near-duplicates on one side too
        self.near_joined = len(groups) - len(joined)
        # the cut by exact content, as without the near-duplicate check (the same seed gives
        # the same split); then each near-duplicate family moves whole to its first member's
        # side, so only those samples move
        cut = split_groups(list(groups.values()), cfg.split_seed,
                           cfg.val_fraction if "val" in self.missing else 0.0,
                           cfg.test_fraction if "test" in self.missing else 0.0)
        if self.near_joined:
            cut = keep_families_together(cut, joined)
        if not cut["train"]:  # refused in decide(), with whatever else is wrong
            distinct = len(joined) < len(train)
            self.too_small = str(too_small(cfg.root, len(joined), self.missing,
                                           "distinct sample" if distinct else "sample"))
        indices["train"] = cut["train"]
        for split in self.missing:
            self.sources[split], indices[split] = train, cut[split]
        return indices

    def decide(self) -> Checked:
        cfg = self.cfg
        entries = [(s, i) for s in SPLITS for i in self.indices[s]]
        out = Checked(self.sources, {}, warnings=[], refusals=[])
        if self.too_small:
            out.refusals.append(self.too_small)
        left_out: set = set()
        broken = [e for e in entries if self.fact(e).error and not self.fact(e).unreadable]
        if broken:  # decodable files whose content cannot be used as it is (each says why)
            out.refusals.append(f"{len(broken)} sample(s) cannot be used: "
                                + _errors(broken, self.fact))
        usable = readable = [e for e in entries if not self.fact(e).error]
        min_size = self.min_image_size
        faults = {  # per-sample problems data.skip_bad_samples may leave out
            "unreadable": ([e for e in entries if self.fact(e).unreadable],
                           "are missing or corrupt", "restore or replace them"),
            "small": ([e for e in usable if min(self.fact(e).size) < min_size],
                      f"have a target whose shorter side is below data.min_image_size="
                      f"{min_size} (upscaled {cfg.resolution / max(1, min_size):g}x or more, "
                      "they train on blur)", "replace them with larger images, or lower "
                      "data.min_image_size"),
            "small condition": (
                [e for e in usable if 0 < min(self.fact(e).condition_size) < min_size],
                f"have a condition whose shorter side is below data.min_image_size={min_size} "
                "(upscaled to its target's size, it trains on blur)", "store conditions at "
                "their targets' size, or lower data.min_image_size"),
            "aspect": ([e for e in usable if self._ratio(e) > (cfg.max_aspect_ratio or 1e9)],
                       f"have a target more than {cfg.max_aspect_ratio:g} times as long as it "
                       "is wide or the reverse (a square crop keeps a sliver the caption does "
                       "not describe)" if cfg.max_aspect_ratio else "",
                       "crop them, or raise data.max_aspect_ratio (null: no limit)"),
        }
        for kind, (found, what, fix) in faults.items():
            if not found:
                continue
            if cfg.skip_bad_samples:
                left_out.update(found)
                out.warnings.append(f"data: skipped {len(found)} sample(s) that {what} "
                                    f"(data.skip_bad_samples=true); first: "
                                    + (_errors(found, self.fact) if kind == "unreadable"
                                       else _names(found, self.fact)))
            else:
                shown = (_errors(found, self.fact) if kind == "unreadable"
                         else _names(found, self.fact))
                out.refusals.append(f"{len(found)} sample(s) {what}: {shown}. Fix: {fix}, or "
                                    "set data.skip_bad_samples=true to leave them out")
        usable = [e for e in usable if e not in left_out]
        dropped = self._duplicates(usable, out, left_out)
        out.indices = {s: [i for i in self.indices[s] if (s, i) not in left_out] for s in SPLITS}
        self._warn_unusual(usable, out, left_out)
        out.summary = {"samples": {s: len(out.indices[s]) for s in SPLITS},
                       "duplicates": self.copies, "duplicate_groups": len(self.groups),
                       "duplicates_across_splits": len(self.across),
                       "near_duplicates_across_splits": len(self.near_across),
                       "near_duplicate_groups_joined": self.near_joined,
                       "duplicates_policy": str(cfg.duplicates), "duplicates_dropped": dropped,
                       "left_out": len(left_out) - dropped, "refused": bool(out.refusals)}
        out.report = self._report(entries, readable, out)
        return out

    @functools.cached_property
    def min_image_size(self) -> int:
        size = self.cfg.min_image_size
        return self.cfg.resolution // 4 if size is None else size

    def _ratio(self, entry) -> float:
        w, h = self.fact(entry).size
        return max(w, h) / max(1, min(w, h))

    def _duplicates(self, usable: list, out: Checked, left_out: set) -> int:
        """Groups of identical content: kept (data.duplicates=keep) or dropped to one copy.
        Refused whatever the policy but drop: the same entry listed again (same files, same
        captions: a shard concatenated twice) and a group across given splits (a leak).
        Returns how many were dropped."""
        by_content: dict[str, list] = defaultdict(list)
        for entry in usable:
            by_content[self.fact(entry).content].append(entry)
        self.groups = [g for g in by_content.values() if len(g) > 1]
        self.copies = sum(len(g) - 1 for g in self.groups)
        self.across = [g for g in self.groups if len({s for s, _ in g}) > 1]
        distance = self.cfg.near_duplicate_distance
        self.near_across = ([] if distance is None else across_sources(
            usable, self.fact, lambda e: self.sources[e[0]], distance))
        near_dropped = 0
        if self.near_across and self.cfg.duplicates == "drop":  # a held-out copy is kept
            training = {max(p[:2], key=lambda e: KEEP_FIRST.index(e[0])) for p in self.near_across}
            left_out.update(training)
            near_dropped = len(training)
            out.warnings.append(drop_message(self.near_across, self.fact, distance, near_dropped))
        elif self.near_across:
            out.refusals.append(leak_message(self.near_across, self.fact, distance))
        seen: dict = {}
        self.repeats = []  # (repeat, the entry it repeats)
        for entry in usable:
            f = self.fact(entry)
            if f.entry:
                first = seen.setdefault((entry[0], f.entry, tuple(f.captions)), entry)
                if first != entry:
                    self.repeats.append((entry, first))
        if not self.groups:
            return near_dropped

        def pairs(groups) -> str:
            return "; ".join(" = ".join(self.fact(e).name for e in g[:2]) for g in groups[:3])

        if self.cfg.duplicates == "drop":
            for group in self.groups:
                keep = min(group, key=lambda e: (KEEP_FIRST.index(e[0]), e[1]))
                left_out.update(e for e in group if e != keep)
            out.warnings.append(f"data: left out {self.copies} duplicate sample(s) "
                                f"(data.duplicates=drop; {len(self.groups)} group(s) of "
                                "identical condition and target, one copy of each kept); e.g. "
                                f"{pairs(self.groups)}")
            return self.copies + near_dropped
        if self.repeats:
            out.refusals.append(f"{len(self.repeats)} entr(y/ies) repeat an earlier one exactly "
                                f"(the same files, the same captions), e.g. {pairs(self.repeats)}"
                                ". Fix: remove the repeated lines (a shard concatenated twice?), "
                                "or set data.duplicates=drop to train on one copy of each")
        if self.across:
            out.refusals.append(f"{sum(len(g) for g in self.across)} samples in "
                                f"{len(self.across)} group(s) of identical condition and target "
                                "lie on both sides of the given splits: a held-out sample that "
                                "is also a training sample measures memorisation, not "
                                f"generalisation; e.g. {pairs(self.across)}. Fix: remove one "
                                "side's copy, or set data.duplicates=drop (a held-out copy is "
                                "kept, the training copies left out)")
        if not out.refusals:
            out.warnings.append(f"data: {self.copies} sample(s) repeat another's decoded "
                                f"condition and target ({len(self.groups)} group(s), each kept "
                                "on one side of the split; data.duplicates=drop keeps one copy "
                                f"of each); e.g. {pairs(self.groups)}")
        return near_dropped

    def _warn_unusual(self, usable: list, out: Checked, left_out: set) -> None:
        kept, res = [e for e in usable if e not in left_out], self.cfg.resolution
        upscaled = {  # a condition upscaled more than its target: counted on its own
            "target": ([e for e in kept if min(self.fact(e).size) < res], "size", ""),
            "condition": ([e for e in kept if 0 < min(self.fact(e).condition_size)
                           < min(res, *self.fact(e).size)], "condition_size",
                          "their target and ")}
        for role, (found, size, than) in upscaled.items():
            if found:
                w, h = min((getattr(self.fact(e), size) for e in found), key=min)
                out.warnings.append(f"data: {len(found)} of {len(kept)} {role}(s) are smaller "
                                    f"than {than}data.resolution={res} and are upscaled (smallest "
                                    f"{w}x{h}); first: {_names(found, self.fact, 3)}")
        empty = [e for e in kept if self.fact(e).captionless]
        if empty:
            out.warnings.append(f"data: {len(empty)} of {len(kept)} sample(s) have no caption "
                                "(or only whitespace): they train like prompt-dropped samples; "
                                f"first: {_names(empty, self.fact, 3)}")

    def _report(self, entries: list, readable: list, out: Checked) -> list[str]:
        cfg = self.cfg
        facts = [self.fact(e) for e in readable]
        how = ("given" if not self.missing else f"{', '.join(self.missing)} cut from train by "
               f"content group, data.split_seed={cfg.split_seed}")
        modes = [Counter(f.modes[k] for f in facts if len(f.modes) > k) for k in (0, 1)]
        sizes = Counter(f.size for f in facts)
        captions = Counter(f.captions[0] if f.captions else "" for f in facts)
        identical = Counter((f.content, tuple(f.captions)) for f in facts)
        n_identical = sum(n - 1 for n in identical.values())
        area = lambda size: size[0] * size[1]  # noqa: E731
        (w0, h0), (w1, h1) = (min(sizes, key=area), max(sizes, key=area)) if sizes else [(0, 0)] * 2
        size_line = f"{w0}x{h0} .. {w1}x{h1} ({len(sizes)} distinct)"
        lines = [
            f"data check: {cfg.layout} at {cfg.root}: {len(entries)} samples read in "
            f"{self.seconds:.1f} s ({'from the cache' if self.cached else 'decoded'})",
            "  splits      " + ", ".join(f"{s} {len(self.indices[s])}" for s in SPLITS)
            + f" ({how}); after the check: "
            + ", ".join(f"{s} {len(out.indices[s])}" for s in SPLITS),
            "  modes       target: " + describe_modes(modes[0])
            + (f"; condition: {describe_modes(modes[1])}" if modes[1] else ""),
            f"  sizes       target {size_line}; shorter side below data.min_image_size="
            f"{self.min_image_size}: "
            f"{sum(min(f.size) < self.min_image_size for f in facts)}; below data.resolution="
            f"{cfg.resolution} (upscaled): {sum(min(f.size) < cfg.resolution for f in facts)}; "
            f"aspect above {cfg.max_aspect_ratio or 0:g}:1: "
            f"{sum(self._ratio(e) > (cfg.max_aspect_ratio or 1e9) for e in readable)}",
            f"  duplicates  repeated entries (same files, same captions): {len(self.repeats)}; "
            f"identical samples (same pixels, same captions): {n_identical}; repeats of "
            f"another's pixels: {self.copies} in {len(self.groups)} group(s), "
            f"{len(self.across)} across splits (data.duplicates={cfg.duplicates}); near-"
            f"duplicates (data.near_duplicate_distance={cfg.near_duplicate_distance}): "
            f"{len(self.near_across)} across given splits, {self.near_joined} joined in a cut",
            f"  captions    empty {sum(f.captionless for f in facts)}; "
            f"{len(captions)} distinct first captions of {len(facts)} samples "
            f"({sum(n for n in captions.values() if n > 1)} share theirs with another)",
            f"  unreadable  {sum(self.fact(e).unreadable for e in entries)}; other unusable: "
            f"{sum(bool(self.fact(e).error) and not self.fact(e).unreadable for e in entries)}",
        ]
        verdict = ("refused: " + str(len(out.refusals)) + " problem(s) below"
                   if out.refusals else "ok")
        lines.append(f"  verdict     {verdict}; {len(out.warnings)} warning(s)")
        return lines


def check_splits(sources: dict, cfg, cache_dir: str | None = None) -> Checked:
    """The check as training runs it: the splits to use, the warnings; refusals raise."""
    checked = DataCheck(sources, cfg, cache_dir).decide()
    log.info("%s", "\n".join(checked.report))
    checked.raise_if_refused()
    return checked


if __name__ == "__main__":  # `python -m cnexp.data.check`: the report (cnexp/data/check_cli.py)
    from cnexp.data.check_cli import main

    sys.exit(main())

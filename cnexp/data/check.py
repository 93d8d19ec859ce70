"""The data check: what would make a run's numbers wrong, found before training.

    python -m cnexp.data.check [the overrides run.py takes]      # e.g. data=fill50k data.root=..

prints a report: samples per split, image modes and sizes, duplicates (by a hash of the decoded
condition and target, not by file name), captions, unreadable files. Every training run runs the
same check in its data module's setup (cached by the data's fingerprint: a repeat only reads the
cache) and stops with one message naming the samples and the fix on what would make its numbers
wrong: a held-out sample that is also a training sample, an unreadable file, a target far below
the training resolution or with an extreme aspect ratio, duplicates nobody decided about
(data.duplicates). What is merely unusual (upscaled images, empty captions, duplicates dropped
or kept) is a warning with counts. docs/data.md shows the report and its time.
"""
from __future__ import annotations

import functools
import logging
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from omegaconf import DictConfig, OmegaConf

from cnexp.data.images import DataError
from cnexp.data.scan import Facts, scan
from cnexp.data.splits import split_groups, too_small

log = logging.getLogger("cnexp")

SPLITS = ("train", "val", "test")
KEEP_FIRST = ("val", "test", "train")  # data.duplicates=drop keeps a held-out copy first
SHOWN = 5  # samples named per problem
BITS = {"1": "1-bit", "L": "8-bit grey", "LA": "8-bit grey+alpha", "P": "8-bit palette",
        "PA": "8-bit palette+alpha", "RGB": "8-bit RGB", "RGBA": "8-bit RGBA",
        "CMYK": "8-bit CMYK", "YCbCr": "8-bit YCbCr", "I;16": "16-bit grey",
        "I;16B": "16-bit grey", "I;16L": "16-bit grey", "I": "32-bit integer",
        "F": "32-bit float"}


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
        cut = split_groups(list(groups.values()), cfg.split_seed,
                           cfg.val_fraction if "val" in self.missing else 0.0,
                           cfg.test_fraction if "test" in self.missing else 0.0)
        if not cut["train"]:  # refused in decide(), with whatever else is wrong
            distinct = len(groups) < len(train)
            self.too_small = str(too_small(cfg.root, len(groups), self.missing,
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
        seen: dict = {}
        self.repeats = []  # (repeat, the entry it repeats)
        for entry in usable:
            f = self.fact(entry)
            if f.entry:
                first = seen.setdefault((entry[0], f.entry, tuple(f.captions)), entry)
                if first != entry:
                    self.repeats.append((entry, first))
        if not self.groups:
            return 0

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
            return self.copies
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
        return 0

    def _warn_unusual(self, usable: list, out: Checked, left_out: set) -> None:
        kept = [e for e in usable if e not in left_out]
        upscaled = [e for e in kept if min(self.fact(e).size) < self.cfg.resolution]
        if upscaled:
            smallest = min((self.fact(e).size for e in upscaled), key=min)
            out.warnings.append(f"data: {len(upscaled)} of {len(kept)} target(s) are smaller "
                                f"than data.resolution={self.cfg.resolution} and are upscaled "
                                f"(smallest {smallest[0]}x{smallest[1]}); first: "
                                f"{_names(upscaled, self.fact, 3)}")
        empty = [e for e in kept if not any(self.fact(e).captions)]
        if empty:
            out.warnings.append(f"data: {len(empty)} of {len(kept)} sample(s) have no caption: "
                                "they train like prompt-dropped samples; first: "
                                f"{_names(empty, self.fact, 3)}")

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
            "  modes       target: " + _modes(modes[0])
            + (f"; condition: {_modes(modes[1])}" if modes[1] else ""),
            f"  sizes       target {size_line}; shorter side below data.min_image_size="
            f"{self.min_image_size}: "
            f"{sum(min(f.size) < self.min_image_size for f in facts)}; below data.resolution="
            f"{cfg.resolution} (upscaled): {sum(min(f.size) < cfg.resolution for f in facts)}; "
            f"aspect above {cfg.max_aspect_ratio or 0:g}:1: "
            f"{sum(self._ratio(e) > (cfg.max_aspect_ratio or 1e9) for e in readable)}",
            f"  duplicates  repeated entries (same files, same captions): {len(self.repeats)}; "
            f"identical samples (same pixels, same captions): {n_identical}; repeats of "
            f"another's pixels: {self.copies} in {len(self.groups)} group(s), "
            f"{len(self.across)} across splits (data.duplicates={cfg.duplicates})",
            f"  captions    empty {sum(not any(f.captions) for f in facts)}; "
            f"{len(captions)} distinct first captions of {len(facts)} samples "
            f"({sum(n for n in captions.values() if n > 1)} share theirs with another)",
            f"  unreadable  {sum(self.fact(e).unreadable for e in entries)}; other unusable: "
            f"{sum(bool(self.fact(e).error) and not self.fact(e).unreadable for e in entries)}",
        ]
        verdict = ("refused: " + str(len(out.refusals)) + " problem(s) below"
                   if out.refusals else "ok")
        lines.append(f"  verdict     {verdict}; {len(out.warnings)} warning(s)")
        return lines


def _modes(counts: Counter) -> str:
    return ", ".join(f"{mode} ({BITS.get(mode, '?')}) {n}" for mode, n in counts.most_common())


def check_splits(sources: dict, cfg, cache_dir: str | None = None) -> Checked:
    """The check as training runs it: the splits to use, the warnings; refusals raise."""
    checked = DataCheck(sources, cfg, cache_dir).decide()
    log.info("%s", "\n".join(checked.report))
    checked.raise_if_refused()
    return checked


def compose(overrides: list[str]):
    """The config run.py would compose from `overrides` (paths.root: the working directory)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import open_dict

    from cnexp.config import PROJECT_ROOT, register_configs

    register_configs()
    given = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    implicit = [] if "paths.root" in given else [f"paths.root={Path.cwd()}"]
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=[*implicit, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path.cwd())  # not used: nothing is written but the cache
    return cfg


def _caption_lines(cfg, checked: Checked) -> list[str]:
    """Captions the base's tokenizer cannot carry whole (cnexp/data/caption_check.py)."""
    from cnexp.data.caption_check import caption_warnings

    try:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(cfg.base.pretrained, subfolder="tokenizer",
                                                  revision=cfg.base.revision,
                                                  local_files_only=True)  # never a download
    except Exception as err:  # not cached, missing folder: the rest of the report stands
        return [f"  tokenizer   not checked ({cfg.base.pretrained}: {type(err).__name__})"]
    captions, seen = [], set()
    for split, indices in checked.indices.items():
        source = checked.sources[split]
        for index in indices:
            if (id(source), index) not in seen:
                seen.add((id(source), index))
                captions += source.captions(index)
    found = caption_warnings(tokenizer, captions)
    return [f"  tokenizer   {message}" for message in found] or [
        f"  tokenizer   every caption fits the base's {tokenizer.model_max_length}-token "
        "context" + (" and vocabulary" if len(tokenizer.get_vocab()) < 49408 else "")]


def main(argv: list[str] | None = None) -> int:
    """Print the report for the data `python run.py <argv>` would train on; exit code 2 if a
    run would refuse it (as run.py exits on a user error), 0 otherwise."""
    from cnexp.data.datamodule import open_sources
    from cnexp.errors import CnexpError
    from cnexp.tinyworld.shapes import ensure_tiny_dataset

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        cfg = compose(argv)
        data = cfg.data
        from cnexp.config import DataConfig
        from cnexp.validate import fail, ranged_fields

        for key, value, allowed in ranged_fields(data, DataConfig, "data."):
            if value is not None and not allowed.ok(value):  # as run.py checks them
                fail(key, f"is {value}; {allowed.reason(value)}")
        if data.generate_tinyworld:
            ensure_tiny_dataset(Path(data.root), {"train": data.train_size,
                                                  "val": data.val_size, "test": data.test_size})
        checked = DataCheck(open_sources(data, data.cache_dir), data, data.cache_dir).decide()
    except CnexpError as err:
        print(f"data check: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # Hydra's composition errors (a mistyped knob): its message
        if type(err).__module__.startswith(("hydra", "omegaconf")):
            print(f"data check: {err}", file=sys.stderr)
            return 2
        raise
    print("\n".join(checked.report + _caption_lines(cfg, checked)))
    for message in checked.warnings:
        print(f"warning: {message}")
    if checked.refusals:
        print("refused (a training run stops here):\n  " + "\n  ".join(checked.refusals))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fuzz test of the data path (issue 25, item 5): hypothesis builds small fill50k data sets with
corruptions drawn from a catalogue and asserts that each one either loads right (every item the
colour, condition and caption it was written with; no content on both sides of the split) or
stops before training with one CnexpError that names a corrupted file or line. Any other
exception, or a set that loads with a wrong item, fails the test.

    python -m pytest -q tests/test_data_fuzz.py                       # 25 examples, fixed: CI
    CNEXP_FUZZ=long python -m pytest -q tests/test_data_fuzz.py       # 500, new ones each run
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from PIL import Image

from cnexp.config import DataConfig
from cnexp.data.datamodule import TriplesDataModule
from cnexp.errors import CnexpError

# hypothesis writes failing examples as patches under its home: a tmp dir, not the checkout
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="cnexp-hypothesis-"))
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          database=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=500, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("CNEXP_FUZZ", "ci")

SIZE, RESOLUTION = 16, 16
# Pillow modes a target is re-saved in (file suffix): each decodes to a known colour
MODES = {"1": ".png", "L": ".png", "LA": ".png", "P": ".png", "RGB": ".png", "RGBA": ".png",
         "CMYK": ".tif", "I;16": ".png", "I": ".tif", "F": ".tif"}
# per-sample corruptions; True: the run must stop (unless data.skip_bad_samples leaves it out)
SKIPPABLE = {"truncate", "zero_byte", "missing", "garbage", "tiny", "sliver"}
REFUSED = {"float_range", "condition_aspect", "missing_key", "bad_json", "prompt_type",
           "repeat_line", "outside_root"} | SKIPPABLE
BENIGN = {"mode", "condition_mode", "small", "copy_content", "unicode_name", "unicode_caption"}
KINDS = sorted(REFUSED | BENIGN)


@dataclass
class Expected:
    colour: tuple  # the target's colour as decoded
    grey: int  # the condition's grey level
    caption: str


@dataclass
class Built:
    root: Path
    records: list = field(default_factory=list)  # prompt.json lines (dicts, or raw strings)
    expected: list = field(default_factory=list)  # per record: Expected, or None if left out
    refusals: list = field(default_factory=list)  # tokens a refusal must name (one suffices)
    skipped: int = 0


def grey_of(colour) -> int:
    return Image.new("RGB", (1, 1), colour).convert("L").getpixel((0, 0))


def write_mode(path: Path, mode: str, colour) -> tuple:
    """A solid image of `colour` stored in `mode`; returns the colour it decodes to."""
    g = grey_of(colour)
    if mode in ("RGB", "CMYK"):
        Image.new("RGB", (SIZE, SIZE), colour).convert(mode).save(path)
        return colour
    if mode in ("RGBA", "P"):
        img = Image.new("RGBA", (SIZE, SIZE), (*colour, 255))
        (img if mode == "RGBA" else img.convert("RGB").convert(
            "P", palette=Image.Palette.ADAPTIVE)).save(path)  # exact (the web palette is not)
        return colour
    value = {"1": int(g >= 128), "L": g, "LA": (g, 255), "I;16": g * 257, "I": g * 257,
             "F": g / 255}[mode]
    Image.new(mode, (SIZE, SIZE), value).save(path)
    return (255,) * 3 if mode == "1" and g >= 128 else (0,) * 3 if mode == "1" else (g,) * 3


def corrupt(built: Built, i: int, kind: str, mode: str, skip: bool) -> None:
    """Apply one corruption to sample i (its record, files and expectation)."""
    root, record, line = built.root, built.records[i], f"prompt.json:{i + 1}"
    target, source = root / record["target"], root / record["source"]
    exp = built.expected[i]
    if kind in SKIPPABLE and skip:
        built.expected[i], built.skipped = None, built.skipped + 1
    elif kind in REFUSED:
        built.refusals += [target.name, source.name, line]
    if kind == "truncate":
        target.write_bytes(target.read_bytes()[:40])
    elif kind == "zero_byte":
        source.write_bytes(b"")
    elif kind == "missing":
        target.unlink()
    elif kind == "garbage":
        target.write_bytes(b"NOTANIMAGE" + bytes(range(64)))
    elif kind in ("tiny", "sliver", "small", "condition_aspect"):
        size = {"tiny": (1, 1), "sliver": (4000, 30), "small": (12, 12),
                "condition_aspect": (SIZE, 2 * SIZE)}[kind]
        if kind != "condition_aspect":
            Image.new("RGB", size, exp.colour).save(target)
        Image.new("L", size, exp.grey).save(source)
    elif kind == "float_range":
        Image.new("F", (SIZE, SIZE), 3.5).save(target.with_suffix(".tif"))
        record["target"] = target.with_suffix(".tif").name
    elif kind == "mode":
        new = target.with_name(f"m{i}{MODES[mode]}")
        exp.colour = write_mode(new, mode, exp.colour)
        record["target"] = new.name
    elif kind == "condition_mode":  # black or white: exact in every mode
        new = source.with_name(f"c{i}{MODES[mode]}")
        write_mode(new, mode, (exp.grey,) * 3)
        record["source"] = new.name
    elif kind == "missing_key":
        del record["prompt"]
    elif kind == "bad_json":
        built.records[i] = "{oops"
    elif kind == "prompt_type":
        record["prompt"] = 42
    elif kind == "repeat_line":
        built.records.append(dict(record))
        built.expected.append(None)
    elif kind == "outside_root":
        record["target"] = "../elsewhere.png"
    elif kind == "copy_content":  # the same pixels under other names, another caption
        for path in (target, source):
            (root / f"copy {path.name}").write_bytes(path.read_bytes())
        built.records.append({"source": f"copy {source.name}", "target": f"copy {target.name}",
                              "prompt": f"another caption {i}"})
        built.expected.append(Expected(exp.colour, exp.grey, f"another caption {i}"))
    elif kind == "unicode_name":
        new = root / f"tärget ü 名前 {i}.png"
        target.rename(new)
        record["target"] = new.name
    elif kind == "unicode_caption":
        record["prompt"] = exp.caption = f"ünïcödé 🙂\u2028 {i}"


@st.composite
def data_sets(draw):
    n = draw(st.integers(8, 12))
    picks = draw(st.lists(st.tuples(st.sampled_from(KINDS), st.sampled_from(sorted(MODES))),
                          max_size=3))
    order = draw(st.permutations(range(n)))
    return n, list(zip(order, picks)), draw(st.booleans()), draw(st.sampled_from(
        ["utf-8", "utf-8-bom", "latin-1", "utf-16"]))


def build(root: Path, n: int, picks, skip: bool, encoding: str) -> Built:
    built = Built(root)
    for i in range(n):
        colour = (i * 20 % 256, 255 - i * 20 % 256, 60)
        Image.new("RGB", (SIZE, SIZE), colour).save(root / f"t{i}.png")
        Image.new("L", (SIZE, SIZE), 255 * (i % 2)).save(root / f"s{i}.png")
        built.records.append({"source": f"s{i}.png", "target": f"t{i}.png", "prompt": f"p {i}"})
        built.expected.append(Expected(colour, 255 * (i % 2), f"p {i}"))
    for i, (kind, mode) in picks:
        corrupt(built, i, kind, mode, skip)
    if encoding in ("latin-1", "utf-16"):  # with é: not UTF-8, refused naming the file
        built.records[0] = dict(built.records[0], prompt="café") if isinstance(
            built.records[0], dict) else built.records[0]
        built.refusals.append("prompt.json")
    text = "\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)
                     for r in built.records) + "\n"
    data = (text.encode("latin-1", errors="replace") if encoding == "latin-1" else
            text.encode("utf-16") if encoding == "utf-16" else
            b"\xef\xbb\xbf" * (encoding == "utf-8-bom") + text.encode())
    (root / "prompt.json").write_bytes(data)
    return built


def pixel(tensor, scale, offset) -> tuple:
    return tuple(int(v) for v in ((tensor[:, 8, 8] + offset) * scale).round())


def check_loaded(data: TriplesDataModule, built: Built) -> None:
    """Every item is what was written; no content on both sides of the split."""
    wanted = [e for e in built.expected if e is not None]
    assert sum(len(d) for d in data.datasets.values()) == len(wanted)
    seen = {}
    for split, dataset in data.datasets.items():
        for i in range(len(dataset)):
            item = dataset[i]
            exp = built.expected[item["index"]]
            assert exp is not None, f"{split} holds sample {item['index']}, which must be out"
            got = pixel(item["image"], 127.5, 1.0)
            assert all(abs(a - b) <= 2 for a, b in zip(got, exp.colour)), (got, exp)
            assert pixel(item["condition"], 255.0, 0.0) == (exp.grey,) * 3
            assert item["caption"] == exp.caption
            key = (item["image"].numpy().tobytes(), item["condition"].numpy().tobytes())
            held_out = split != "train"
            assert seen.setdefault(key, held_out) == held_out, "the same content on both sides"
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape[1:] == (3, RESOLUTION, RESOLUTION)
    assert torch.isfinite(batch["image"]).all() and torch.isfinite(batch["condition"]).all()


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(settings.get_profile(PROFILE))
@given(data_sets())
def test_corrupted_data_sets_load_right_or_stop_naming_the_file(case):
    n, picks, skip, encoding = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data set"
        (root).mkdir()
        built = build(root, n, picks, skip, encoding)
        cfg = DataConfig(root=str(root), resolution=RESOLUTION, batch_size=4,
                         skip_bad_samples=skip)
        try:
            data = TriplesDataModule(cfg)
            data.setup()
        except CnexpError as err:
            message = str(err)
            emptied = skip and "is empty after skipping" in message
            assert built.refusals or emptied, f"refused a data set it should load: {message}"
            assert emptied or any(token in message for token in built.refusals), message
            event("stopped with one message")  # --hypothesis-show-statistics counts them
            return
        assert not built.refusals, f"loaded a data set it must refuse: {picks}, {encoding}"
        check_loaded(data, built)
        event("loaded right")

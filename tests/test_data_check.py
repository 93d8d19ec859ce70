"""The data check (cnexp/data/check.py): duplicates, leaks, degenerate images, BOMs, its cache
and its command. Issue 25, findings 6 (a repeated prompt.json leaked held-out samples into
training) and 7 (1x1 and 4000x30 targets trained on silently)."""
import json
import logging
import re

import pytest
from PIL import Image

from cnexp.config import DataConfig
from cnexp.data.check_cli import main as check_main
from cnexp.data.datamodule import TriplesDataModule
from cnexp.data.images import DataError
from cnexp.data.splits import split_indices


def colour(i: int) -> tuple[int, int, int]:
    return (i % 256, 255 - i % 256, (i * 37) % 256)


def write_fill50k(root, n=20, size=(16, 16), lines=None):
    """n distinct samples (one colour each); `lines` (indices) picks which are listed, in order."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, colour(i)).save(root / f"t{i}.png")
        Image.new("L", size, 255 if i % 2 else 0).save(root / f"s{i}.png")
    records = [json.dumps({"source": f"s{i}.png", "target": f"t{i}.png", "prompt": f"p {i}"})
               for i in (range(n) if lines is None else lines)]
    (root / "prompt.json").write_text("\n".join(records) + "\n")
    return root


def setup(root, **overrides) -> TriplesDataModule:
    data = TriplesDataModule(DataConfig(root=str(root), resolution=16, **overrides))
    data.setup()
    return data


def contents(data, split):
    """The target colours a split holds: what a leak would share between splits."""
    dataset = data.datasets[split]
    return {dataset.source.load(i).image.getpixel((0, 0)) for i in dataset.indices}


# --- finding 6: a repeated prompt.json -------------------------------------------------------

def test_prompt_json_concatenated_twice_stops_before_training(tmp_path):
    root = write_fill50k(tmp_path / "d", lines=list(range(20)) * 2)
    with pytest.raises(DataError, match=r"20 entr\(y/ies\) repeat an earlier one exactly .*"
                                        r"t\d+\.png .*prompt\.json:\d+.*data\.duplicates=drop"):
        setup(root)


def test_dropping_duplicates_trains_on_one_copy_and_holds_none_out_twice(tmp_path):
    root = write_fill50k(tmp_path / "d", lines=list(range(20)) * 2)
    data = setup(root, duplicates="drop")
    assert sum(len(d) for d in data.datasets.values()) == 20
    assert not contents(data, "train") & (contents(data, "val") | contents(data, "test"))
    assert data.data_check["duplicates"] == 20 and data.data_check["duplicates_dropped"] == 20


def test_same_content_under_other_names_lands_on_one_side_of_the_split(tmp_path):
    root = write_fill50k(tmp_path / "d", n=40)
    for i in range(40):  # every sample twice, the copy under another file name
        (root / f"copy{i}.png").write_bytes((root / f"t{i}.png").read_bytes())
    lines = (root / "prompt.json").read_text().splitlines()
    copies = [re.sub(r'"t(\d+)\.png"', r'"copy\1.png"', line) for line in lines]
    (root / "prompt.json").write_text("\n".join(lines + copies) + "\n")
    data = setup(root, val_fraction=0.2, test_fraction=0.2)  # data.duplicates=keep
    train, held_out = contents(data, "train"), contents(data, "val") | contents(data, "test")
    assert train and held_out and not train & held_out  # on main: most held out were trained
    assert sum(len(d) for d in data.datasets.values()) == 80  # kept, each pair on one side
    assert data.data_check["duplicates"] == 40 and data.data_check["duplicate_groups"] == 40


def test_without_duplicates_the_split_is_the_per_sample_one(tmp_path):
    data = setup(write_fill50k(tmp_path / "d", n=30), split_seed=7, val_fraction=0.1,
                 test_fraction=0.2)
    expected = split_indices(30, 7, 0.1, 0.2)
    assert {s: d.indices for s, d in data.datasets.items()} == expected
    assert data.data_check["duplicates"] == 0


def test_same_content_in_given_train_and_val_is_a_leak(tmp_path):
    write_fill50k(tmp_path / "d" / "train", n=10)
    write_fill50k(tmp_path / "d" / "val", n=4)  # colours 0..3: also in train
    write_fill50k(tmp_path / "d" / "test", n=20, lines=[12, 13])
    with pytest.raises(DataError, match=r"lie on both sides of the given splits.*train/t0\.png"
                                        r".* = .*val/t0\.png"):
        setup(tmp_path / "d")
    data = setup(tmp_path / "d", duplicates="drop")  # the training copies go
    assert len(data.datasets["train"]) == 6 and len(data.datasets["val"]) == 4
    assert not contents(data, "train") & contents(data, "val")


# --- finding 7: degenerate images ------------------------------------------------------------

@pytest.mark.parametrize("size, why", [((1, 1), r"below data\.min_image_size=4"),
                                       ((4000, 30), r"more than 4 times as long")])
def test_degenerate_targets_are_refused_by_name(tmp_path, size, why):
    root = write_fill50k(tmp_path / "d")
    Image.new("RGB", size, "red").save(root / "t5.png")
    Image.new("L", size, 0).save(root / "s5.png")
    with pytest.raises(DataError, match=rf"1 sample\(s\) have a target .*{why}.*t5\.png"):
        setup(root)
    data = setup(root, skip_bad_samples=True)  # left out, said so
    assert 5 not in [i for d in data.datasets.values() for i in d.indices]


def test_size_limits_are_knobs(tmp_path):
    root = write_fill50k(tmp_path / "d")
    Image.new("RGB", (64, 8), "red").save(root / "t5.png")
    Image.new("L", (64, 8), 0).save(root / "s5.png")
    with pytest.raises(DataError, match="min_image_size=10"):
        setup(root, min_image_size=10, max_aspect_ratio=None)
    with pytest.raises(DataError, match=r"more than 4 times"):
        setup(root)
    setup(root, max_aspect_ratio=8.0)


def test_small_images_above_the_minimum_are_a_warning_with_counts(tmp_path, caplog):
    root = write_fill50k(tmp_path / "d", size=(12, 12))
    with caplog.at_level(logging.WARNING, logger="cnexp"):
        setup(root)
    assert "20 of 20 target(s) are smaller than data.resolution=16 and are upscaled" in caplog.text


# --- byte-order marks and encodings ----------------------------------------------------------

def test_a_byte_order_mark_is_read(tmp_path):
    root = write_fill50k(tmp_path / "d")
    (root / "prompt.json").write_bytes(b"\xef\xbb\xbf" + (root / "prompt.json").read_bytes())
    assert len(setup(root).datasets["train"]) == 18
    images = tmp_path / "c"
    write_fill50k(images)
    (images / "metadata.csv").write_bytes(
        b"\xef\xbb\xbffile_name,text\n" + b"".join(b"t%d.png,p %d\n" % (i, i) for i in range(20)))
    data = setup(images, layout="captions", annotator="canny")
    assert data.datasets["train"][0]["caption"].startswith("p ")


def test_another_encoding_names_the_file_and_line(tmp_path):
    root = write_fill50k(tmp_path / "d")
    text = (root / "prompt.json").read_text().replace("p 3", "caf\u00e9 3")
    (root / "prompt.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=r"prompt\.json:4 is not UTF-8 .*save the file as UTF-8"):
        setup(root)


# --- the cache and the command ---------------------------------------------------------------

def test_a_repeat_reads_the_cache_and_a_changed_file_is_read_again(tmp_path, monkeypatch):
    import cnexp.data.scan as scan

    root = write_fill50k(tmp_path / "d")
    setup(root, cache_dir=str(tmp_path / "cache"))
    calls = []
    real = scan.read_facts
    monkeypatch.setattr(scan, "read_facts", lambda *a: calls.append(a) or real(*a))
    setup(root, cache_dir=str(tmp_path / "cache"))
    assert calls == []  # nothing decoded again
    Image.new("RGB", (1, 1)).save(root / "t3.png")
    with pytest.raises(DataError, match="t3.png"):
        setup(root, cache_dir=str(tmp_path / "cache"))
    assert len(calls) == 20


def test_the_command_prints_the_report_and_exits_2_on_a_refusal(tmp_path, capsys):
    root = write_fill50k(tmp_path / "d")
    args = ["data=fill50k", f"data.root={root}", f"paths.cache={tmp_path / 'cache'}",
            "data.resolution=16"]
    assert check_main(args) == 0
    out = capsys.readouterr().out
    assert "train 18, val 1, test 1" in out and "RGB (8-bit RGB) 20" in out
    assert "condition: L (8-bit grey) 20" in out and "verdict     ok" in out
    (root / "prompt.json").write_text((root / "prompt.json").read_text() * 2)
    assert check_main(args) == 2
    assert "repeat an earlier one exactly" in capsys.readouterr().out
    assert check_main([*args, "data.duplicates=twice"]) == 2  # a bad choice: one message
    assert "data.duplicates" in capsys.readouterr().err


def test_several_unreadable_files_are_one_message_naming_each(tmp_path):
    root = write_fill50k(tmp_path / "d")
    (root / "t2.png").write_bytes(b"")
    (root / "t4.png").write_bytes((root / "t4.png").read_bytes()[:30])
    (root / "s6.png").unlink()
    with pytest.raises(DataError, match=r"3 sample\(s\) are missing or corrupt: ") as err:
        setup(root)
    for named in ("t2.png is corrupt", "t4.png is corrupt", "s6.png is missing"):
        assert named in str(err.value)


def test_an_image_too_large_to_decode_safely_is_named_not_a_traceback(tmp_path, monkeypatch):
    root = write_fill50k(tmp_path / "d")
    Image.new("RGB", (200, 200), "red").save(root / "t3.png")
    Image.new("L", (200, 200), 0).save(root / "s3.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10000)  # 200x200 > 2x: a "bomb"
    with pytest.raises(DataError, match=r"t3\.png is too large to decode safely"):
        setup(root)


def test_decoding_in_processes_gives_the_facts_of_one_process(tmp_path, monkeypatch):
    import cnexp.data.scan as scan
    from cnexp.data.fill50k import Fill50kSource

    root = write_fill50k(tmp_path / "d")
    (root / "t7.png").write_bytes(b"broken")
    source = Fill50kSource(root)
    serial = [scan.read_facts(source, i) for i in range(len(source))]
    monkeypatch.setattr(scan, "PARALLEL_FROM", 4)
    monkeypatch.setattr(scan, "CHUNK", 3)  # several chunks, the last one short
    assert scan.read_all(source) == serial and serial[7].unreadable

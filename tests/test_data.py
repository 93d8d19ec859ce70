import json

import pytest
import torch
from PIL import Image

from cnexp.config import DataConfig
from cnexp.data.datamodule import TriplesDataModule
from cnexp.data.splits import split_indices
from cnexp.data.fill50k import DataError, Fill50kDataset


def test_tiny_world_triples_have_the_right_ranges(tiny_data):
    item = tiny_data.datasets["train"][0]
    assert item["condition"].shape == (3, 64, 64) and item["image"].shape == (3, 64, 64)
    assert 0 <= item["condition"].min() and item["condition"].max() <= 1
    assert -1 <= item["image"].min() and item["image"].max() <= 1 and item["image"].min() < 0
    assert " background" in item["caption"]


def test_eval_batch_is_identical_across_datamodules(tiny_cfg, tiny_data):
    again = TriplesDataModule(tiny_cfg.data, seed=123)
    a, b = tiny_data.eval_batch(), again.eval_batch()
    assert a["caption"] == b["caption"] and torch.equal(a["condition"], b["condition"])


def test_split_is_deterministic_and_disjoint():
    a, b = split_indices(100, seed=3), split_indices(100, seed=3)
    assert a == b
    assert not set(a["train"]) & set(a["val"]) and not set(a["val"]) & set(a["test"])
    assert sorted(a["train"] + a["val"] + a["test"]) == list(range(100))


def _root(tmp_path, lines):
    (tmp_path / "source").mkdir()
    (tmp_path / "target").mkdir()
    Image.new("RGB", (32, 48), "white").save(tmp_path / "source" / "0.png")
    Image.new("L", (32, 48), 128).save(tmp_path / "target" / "0.png")  # greyscale -> RGB
    (tmp_path / "prompt.json").write_text("\n".join(lines) + "\n")
    return tmp_path


GOOD = json.dumps({"source": "source/0.png", "target": "target/0.png", "prompt": "a circle"})


def test_fill50k_root_is_read_resized_and_cropped(tmp_path):
    item = Fill50kDataset(_root(tmp_path, [GOOD]), resolution=16)[0]
    assert item["image"].shape == (3, 16, 16) and item["caption"] == "a circle"


@pytest.mark.parametrize("line, message", [
    ("{not json", r"prompt\.json:2 is not JSON"),
    (json.dumps({"source": "source/0.png", "prompt": "x"}), r"prompt\.json:2 lacks key\(s\) \['target'\]"),
])
def test_bad_prompt_json_line_is_named(tmp_path, line, message):
    with pytest.raises(DataError, match=message):
        Fill50kDataset(_root(tmp_path, [GOOD, line]), resolution=16)


def test_missing_and_corrupt_images_are_named(tmp_path):
    root = _root(tmp_path, [GOOD, json.dumps({"source": "source/0.png", "target": "target/9.png",
                                              "prompt": "x"})])
    with pytest.raises(DataError, match=r"target/9\.png is missing"):
        Fill50kDataset(root, resolution=16)[1]
    (root / "target" / "0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="corrupt"):
        Fill50kDataset(root, resolution=16)[0]


def test_missing_root_names_the_field(tmp_path):
    with pytest.raises(DataError, match="data.root"):
        TriplesDataModule(DataConfig(root=str(tmp_path / "absent"))).setup()

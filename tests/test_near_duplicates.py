"""Near-duplicates across the split (cnexp/data/near_duplicates.py). Issue 34, item 5: a held-out
sample that was a training sample re-saved as JPEG q90, or resized by one pixel, passed the data
check ("0 across splits", verdict ok) and trained; only pixel-identical copies were caught."""
import io
import json
import logging

import pytest
from PIL import Image

from cnexp.config import DataConfig
from cnexp.data.datamodule import TriplesDataModule
from cnexp.data.images import DataError
from cnexp.data.splits import keep_families_together
from cnexp.tinyworld.shapes import scene_at


def write_split(root, scenes, edit=None):
    """A fill50k root of tiny-world scenes; `edit` maps a sample's position to how its target
    and condition are re-saved (a JPEG copy, a resized copy)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, scene in enumerate(scenes):
        for name, image in (("s", scene.condition()), ("t", scene.target())):
            change = (edit or {}).get(k)
            if change == "jpeg":
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=90)
                image = Image.open(buffer).convert("RGB")
            elif change == "resized":
                image = image.resize((image.width + 1, image.height + 1), Image.BICUBIC)
            image.save(root / f"{name}{k}.png")
        lines.append(json.dumps({"source": f"s{k}.png", "target": f"t{k}.png",
                                 "prompt": scene.caption()}))
    (root / "prompt.json").write_text("\n".join(lines) + "\n")
    return root


def setup(root, **overrides) -> TriplesDataModule:
    data = TriplesDataModule(DataConfig(root=str(root), resolution=64, **overrides))
    data.setup()
    return data


TRAIN = [scene_at(0, i) for i in range(12)]


def given_splits(tmp_path):
    """train: 12 scenes; val: a JPEG q90 copy of train's 3rd and 2 new scenes; test: a copy of
    train's 6th resized by one pixel (65x65) and 2 new scenes."""
    write_split(tmp_path / "train", TRAIN)
    write_split(tmp_path / "val", [TRAIN[2], scene_at(1, 0), scene_at(1, 1)], {0: "jpeg"})
    write_split(tmp_path / "test", [TRAIN[5], scene_at(2, 0), scene_at(2, 1)], {0: "resized"})
    return tmp_path


def test_resaved_and_resized_copies_across_given_splits_stop_naming_the_pairs(tmp_path):
    root = given_splits(tmp_path)
    with pytest.raises(DataError) as err:
        setup(root)
    message = str(err.value)
    assert "2 pair(s) of samples on both sides of the given splits are near-duplicates" in message
    assert "train/t2.png" in message and "val/t0.png" in message  # the JPEG copy's pair
    assert "train/t5.png" in message and "test/t0.png" in message  # the resized copy's pair
    assert "prompt.json:3" in message  # each named with its index line
    assert "data.duplicates=drop" in message and "near_duplicate_distance=null" in message


def test_drop_keeps_the_held_out_copy_and_leaves_the_training_one_out(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cnexp"):
        data = setup(given_splits(tmp_path), duplicates="drop")
    train = data.datasets["train"]
    assert len(train) == 10 and not {2, 5} & set(train.indices)
    assert len(data.datasets["val"]) == 3 and len(data.datasets["test"]) == 3
    assert data.data_check["near_duplicates_across_splits"] == 2
    # said, and counted as dropped duplicates (not as unusable samples left out)
    assert "left out 2 training sample(s) that are near-duplicates of held-out ones" in caplog.text
    assert data.data_check["duplicates_dropped"] == 2 and data.data_check["left_out"] == 0


def test_a_near_duplicate_family_moves_whole_and_nothing_else_moves():
    cut = {"train": [0, 1, 2, 5, 6], "val": [3, 7], "test": [4]}
    moved = keep_families_together(cut, [[0], [1, 3], [2], [4, 6], [5], [7]])
    assert moved == {"train": [0, 1, 2, 3, 5], "val": [7], "test": [4, 6]}


def test_null_distance_checks_exact_copies_only(tmp_path):
    data = setup(given_splits(tmp_path), near_duplicate_distance=None)
    assert data.data_check["near_duplicates_across_splits"] == 0
    assert len(data.datasets["train"]) == 12


def test_a_cut_split_keeps_near_duplicates_on_one_side(tmp_path):
    # 16 distinct scenes, then a JPEG copy of each of the first 8: a per-sample (or exact-group)
    # cut puts some copies in val/test and their originals in train
    scenes = [scene_at(0, i) for i in range(16)] + [scene_at(0, i) for i in range(8)]
    root = write_split(tmp_path / "d", scenes, {16 + i: "jpeg" for i in range(8)})
    data = setup(root, val_fraction=0.25, test_fraction=0.25)
    side = {i: split for split, dataset in data.datasets.items() for i in dataset.indices}
    assert len(side) == 24
    assert all(side[i] == side[16 + i] for i in range(8)), side
    assert data.data_check["near_duplicate_groups_joined"] == 8


def test_distinct_tiny_world_samples_are_not_near_duplicates():
    # the default run's data: train scenes (seed 0) against held-out ones (seeds 1, 2)
    from cnexp.data.near_duplicates import look, near_pairs

    scenes = [scene_at(seed, i) for seed, n in ((0, 300), (1, 60), (2, 60)) for i in range(n)]
    looks = [look(s.target(), s.condition()) for s in scenes]
    distance = DataConfig.near_duplicate_distance
    assert distance == 20
    assert near_pairs(looks, distance, [0] * 300 + [1] * 120) == []

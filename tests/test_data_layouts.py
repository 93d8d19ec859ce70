"""Each layout, generated here with tiny images: the triples read back match what was written."""
import csv
import io
import json
import logging

import pytest
import torch
from PIL import Image

from cnexp.config import DataConfig
from cnexp.data.datamodule import TriplesDataModule
from cnexp.data.fill50k import DataError, Fill50kSource

COLOURS = ["red", "lime", "blue", "yellow", "magenta", "cyan", "white", "orange"]
RGB = {"red": (255, 0, 0), "lime": (0, 255, 0), "blue": (0, 0, 255)}


def png_bytes(colour, size=(16, 16), mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def data_module(root, **overrides) -> TriplesDataModule:
    cfg = DataConfig(root=str(root), resolution=16, batch_size=2, eval_size=2, **overrides)
    data = TriplesDataModule(cfg, seed=0)
    data.setup()
    return data


def pixel(tensor):
    """Colour of the centre pixel of a (3, H, W) image in [-1, 1], as 0..255 ints."""
    return tuple(int(v) for v in ((tensor[:, 8, 8] + 1) * 127.5).round())


# --- fill50k --------------------------------------------------------------------------------

def write_fill50k(root, n=8, prompt=lambda i: f"a {COLOURS[i]} square"):
    (root / "source").mkdir(parents=True)
    (root / "target").mkdir()
    lines = []
    for i in range(n):
        Image.new("L", (16, 16), 255 if i % 2 else 0).save(root / "source" / f"{i}.png")
        Image.new("RGB", (16, 16), COLOURS[i]).save(root / "target" / f"{i}.png")
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png",
                                 "prompt": prompt(i)}))
    (root / "prompt.json").write_text("\n".join(lines) + "\n")
    return root


def test_fill50k_reader_follows_a_hand_written_prompt_json(tmp_path):
    (tmp_path / "source").mkdir()
    (tmp_path / "target").mkdir()
    Image.new("L", (16, 16), 255).save(tmp_path / "source" / "a.png")
    Image.new("RGBA", (16, 16), (0, 0, 255, 128)).save(tmp_path / "target" / "a.png")
    Image.new("L", (16, 16), 0).save(tmp_path / "source" / "b.png")
    Image.new("RGB", (16, 16), "red").save(tmp_path / "target" / "b.png")
    (tmp_path / "prompt.json").write_text(
        '{"source": "source/a.png", "target": "target/a.png", "prompt": "blue square"}\n'
        "\n"  # blank lines are skipped
        '{"source": "source/b.png", "target": "target/b.png", "prompt": ""}\n')
    source = Fill50kSource(tmp_path)
    first, second = source.load(0), source.load(1)
    assert first.captions == ["blue square"] and second.captions == [""]
    assert first.origin.endswith("prompt.json:1") and second.origin.endswith("prompt.json:3")
    assert first.image.mode == "RGB" and first.image.getpixel((0, 0)) == (0, 0, 255)  # RGBA->RGB
    assert first.condition.getpixel((0, 0)) == (255, 255, 255)  # grey -> RGB


def test_fill50k_root_without_splits_is_cut_by_split_seed_not_run_seed(tmp_path):
    root = write_fill50k(tmp_path / "fill")
    a = data_module(root, val_fraction=0.25, test_fraction=0.25)
    b = TriplesDataModule(a.cfg, seed=99)
    b.setup()
    assert {s: len(d) for s, d in a.datasets.items()} == {"train": 4, "val": 2, "test": 2}
    assert a.datasets["val"].indices == b.datasets["val"].indices
    batch = a.eval_batch()
    for caption, image, index in zip(batch["caption"], batch["image"], batch["index"]):
        assert caption == f"a {COLOURS[index]} square"  # captions stay with their images
    other = data_module(root, val_fraction=0.25, test_fraction=0.25, split_seed=5)
    assert set(other.datasets["val"].indices) != set(a.datasets["val"].indices)


def test_several_captions_are_picked_at_random_in_training_only(tmp_path):
    captions = lambda i: [f"cap {i} {k}" for k in range(4)]  # noqa: E731
    root = write_fill50k(tmp_path / "fill", n=4, prompt=captions)
    data = data_module(root, val_fraction=0.25, test_fraction=0.25)
    train, val = data.datasets["train"], data.datasets["val"]
    torch.manual_seed(0)
    drawn = [train[0]["caption"] for _ in range(20)]
    torch.manual_seed(0)
    assert drawn == [train[0]["caption"] for _ in range(20)]  # seeded
    assert len(set(drawn)) > 1 and all(c.startswith(f"cap {train.indices[0]} ") for c in drawn)
    assert {val[0]["caption"] for _ in range(5)} == {f"cap {val.indices[0]} 0"}  # fixed for eval


def test_random_crop_cuts_image_and_condition_identically(tmp_path):
    (tmp_path / "img").mkdir()
    ramp = (torch.arange(40) * 6).to(torch.uint8).expand(16, 40)  # wide and left-to-right
    lines = []
    for i in range(4):  # distinct samples: a repeat (or a ramp a shade brighter, a near-
        rows = ramp // 2 + 40 * i  # duplicate) is refused or grouped by the data check
        Image.fromarray(rows.numpy()).convert("RGB").save(tmp_path / "img" / f"{i}.png")
        lines.append(json.dumps({"source": f"img/{i}.png", "target": f"img/{i}.png",
                                 "prompt": "x"}))
    (tmp_path / "prompt.json").write_text("\n".join(lines) + "\n")
    data = data_module(tmp_path, crop="random", val_fraction=0.25, test_fraction=0.25)
    crops = []
    for _ in range(8):
        item = data.datasets["train"][0]
        assert torch.allclose(item["condition"] * 2 - 1, item["image"], atol=1e-6)
        crops.append(item["image"][0, 0, 0].item())
    assert len(set(crops)) > 1  # the crop moves between draws...
    val = data.datasets["val"]
    assert torch.equal(val[0]["image"], val[0]["image"])  # ...but not for evaluation


# --- Hugging Face datasets ------------------------------------------------------------------

def hf_table(n=6, **columns):
    from datasets import Dataset, Features, Image as HFImage, Value

    names = {"image": "image", "conditioning_image": "conditioning_image", "text": "text",
             **columns}
    rows = {names["image"]: [{"bytes": png_bytes(COLOURS[i]), "path": None} for i in range(n)],
            names["conditioning_image"]: [{"bytes": png_bytes("white", mode="L"), "path": None}
                                          for _ in range(n)],
            names["text"]: [f"row {i}" for i in range(n)]}
    features = Features({names["image"]: HFImage(), names["conditioning_image"]: HFImage(),
                         names["text"]: Value("string")})
    return Dataset.from_dict(rows, features=features)


def check_rows(data, split="train"):
    dataset = data.datasets[split]
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["caption"] == f"row {item['index']}"
        assert item["condition"].min() == 1.0  # white condition, grey stored
        if COLOURS[item["index"]] in RGB:
            assert pixel(item["image"]) == RGB[COLOURS[item["index"]]]


def test_parquet_files_with_diffusers_columns(tmp_path):
    (tmp_path / "pq" / "data").mkdir(parents=True)
    hf_table().to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    data = data_module(tmp_path / "pq", layout="hf", cache_dir=str(tmp_path / "cache"),
                       val_fraction=0.2, test_fraction=0.2)
    assert {s: len(d) for s, d in data.datasets.items()} == {"train": 4, "val": 1, "test": 1}
    check_rows(data)
    check_rows(data, "val")


def test_save_to_disk_with_a_validation_split_and_custom_columns(tmp_path):
    from datasets import DatasetDict

    table = hf_table(image="target", conditioning_image="source", text="prompt")
    # validation rows not also in train: the data check refuses a leak
    DatasetDict({"train": table.select(range(4)), "validation": table.select([4, 5])}
                ).save_to_disk(str(tmp_path / "disk"))
    data = data_module(tmp_path / "disk", layout="hf", image_column="target",
                       conditioning_image_column="source", caption_column="prompt",
                       val_fraction=0.2, test_fraction=0.2)
    assert len(data.datasets["val"]) == 2 and len(data.datasets["test"]) == 1  # test cut
    assert len(data.datasets["train"]) == 3


def test_imagefolder_with_metadata_jsonl(tmp_path):
    root = tmp_path / "folder"
    root.mkdir()
    with (root / "metadata.jsonl").open("w") as f:
        for i in range(5):
            Image.new("RGB", (16, 16), COLOURS[i]).save(root / f"{i}.png")
            Image.new("L", (16, 16), 255).save(root / f"{i}_cond.png")
            f.write(json.dumps({"file_name": f"{i}.png",
                                "conditioning_image_file_name": f"{i}_cond.png",
                                "text": f"row {i}"}) + "\n")
    data = data_module(root, layout="hf", cache_dir=str(tmp_path / "cache"))
    assert sum(len(d) for d in data.datasets.values()) == 5
    check_rows(data)


# --- images + captions ----------------------------------------------------------------------

def test_captions_from_txt_sidecars_with_canny_conditions(tmp_path):
    from cnexp.data.annotators import get_annotator

    for i in range(4):
        img = Image.new("RGB", (16, 16), "black")
        img.paste(Image.new("RGB", (8, 8), COLOURS[i]), (4, 4))
        img.save(tmp_path / f"{i}.png")
    (tmp_path / "0.txt").write_text("first caption\nsecond caption\n")
    (tmp_path / "1.txt").write_text("")  # empty caption is fine; 2 and 3 have no sidecar
    data = data_module(tmp_path, layout="captions", annotator="canny",
                       val_fraction=0.25, test_fraction=0.25)
    source = data.datasets["train"].source
    assert source.load(0).captions == ["first caption", "second caption"]
    assert source.load(1).captions == [""] and source.load(3).captions == [""]
    item = data.datasets["val"][0]
    expected = get_annotator("canny")(Image.open(tmp_path / f"{item['index']}.png"))
    assert torch.equal(item["condition"], torch.from_numpy(expected).permute(2, 0, 1) / 255.0)


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_captions_from_metadata(tmp_path, kind):
    for i in range(4):
        Image.new("RGB", (16, 16), COLOURS[i]).save(tmp_path / f"{i}.png")
    if kind == "jsonl":
        (tmp_path / "metadata.jsonl").write_text("".join(
            json.dumps({"file_name": f"{i}.png", "caption": [f"c{i}", f"d{i}"]}) + "\n"
            for i in range(4)))
    else:
        with (tmp_path / "metadata.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file_name", "caption"])
            writer.writerows([[f"{i}.png", f"c{i}"] for i in range(4)])
    data = data_module(tmp_path, layout="captions", annotator="canny", caption_column="caption",
                       val_fraction=0.25, test_fraction=0.25)
    item = data.datasets["val"][0]
    assert item["caption"] == f"c{item['index']}"


def test_unknown_layout_and_captions_without_annotator_are_named(tmp_path):
    with pytest.raises(DataError, match="data.layout='nope'.*fill50k, hf, captions"):
        data_module(tmp_path, layout="nope")
    with pytest.raises(DataError, match="data.annotator"):
        data_module(tmp_path, layout="captions")


def test_composed_captions_preset_carries_annotator_params():
    from conftest import compose_cfg

    cfg = compose_cfg(["data=captions", "data.root=/x", "data.annotator_params.low_threshold=50"])
    assert cfg.data.layout == "captions" and cfg.data.annotator == "canny"
    assert cfg.data.annotator_params.low_threshold == 50


def test_skip_bad_samples_logs_count_and_paths(tmp_path, caplog):
    root = write_fill50k(tmp_path / "fill")
    (root / "target" / "3.png").write_bytes(b"broken")
    (root / "target" / "5.png").unlink()
    with caplog.at_level(logging.WARNING, logger="cnexp"):
        data = data_module(root, skip_bad_samples=True, val_fraction=0.25, test_fraction=0.25)
    assert sum(len(d) for d in data.datasets.values()) == 6
    assert "3.png" in caplog.text and "5.png" in caplog.text and "skipped" in caplog.text


def test_worker_loaders_are_deterministic_with_the_seed(tmp_path):
    for i in range(8):
        Image.new("RGB", (24, 16), COLOURS[i]).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"a {i}\nb {i}\nc {i}\n")

    def epoch(seed):
        cfg = DataConfig(root=str(tmp_path), layout="captions", annotator="canny", resolution=16,
                         crop="random", batch_size=2, num_workers=2, val_fraction=0.125,
                         test_fraction=0.125, cache_dir=str(tmp_path / "cache"))
        data = TriplesDataModule(cfg, seed=seed)
        data.setup()
        batches = list(data.train_dataloader())
        return [c for b in batches for c in b["caption"]], torch.cat([b["image"] for b in batches])

    (captions, images), (again, images_again) = epoch(0), epoch(0)
    assert captions == again and torch.equal(images, images_again)
    assert epoch(1)[0] != captions

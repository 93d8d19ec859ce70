"""Each bad input gives one CnexpError naming the file, line or field, and the fix."""
import io
import json

import pytest
from PIL import Image

from cnexp.config import DataConfig
from cnexp.data.datamodule import TriplesDataModule
from cnexp.data.images import DataError
from cnexp.errors import CnexpError


def setup(root, **overrides) -> TriplesDataModule:
    data = TriplesDataModule(DataConfig(root=str(root), resolution=16, **overrides))
    data.setup()
    return data


def fill50k(root, pairs):
    """pairs: (condition image, target image) per line; None writes no file."""
    lines = []
    for i, (condition, image) in enumerate(pairs):
        for name, img in (("s", condition), ("t", image)):
            if img is not None:
                img.save(root / f"{name}{i}.png")
        lines.append(json.dumps({"source": f"s{i}.png", "target": f"t{i}.png", "prompt": "x"}))
    (root / "prompt.json").write_text("\n".join(lines) + "\n")
    return root


def square(size=(16, 16), colour="red"):
    return Image.new("RGB", size, colour)


@pytest.mark.parametrize("layout", ["fill50k", "hf", "captions"])
def test_missing_root_names_data_root(tmp_path, layout):
    with pytest.raises(DataError, match=r"data\.root .*does not exist"):
        setup(tmp_path / "absent", layout=layout, annotator="canny" if layout == "captions"
              else None)


def test_prompt_json_line_that_is_not_an_object(tmp_path):
    (tmp_path / "prompt.json").write_text('[1, 2]\n')
    with pytest.raises(DataError, match=r"prompt\.json:1 is not a JSON object"):
        setup(tmp_path)


def test_condition_of_other_aspect_ratio_cannot_be_reconciled(tmp_path):
    root = fill50k(tmp_path, [(square((16, 32)), square((32, 16)))] * 4)
    with pytest.raises(DataError, match=r"prompt\.json:\d+: condition is 16x32 but image is "
                                        r"32x16; their aspect ratios differ"):
        setup(root)  # the data check reads every sample before training


def test_condition_at_another_scale_of_the_same_frame_is_resized(tmp_path):
    # distinct targets: identical samples would be one content group, too few to split
    root = fill50k(tmp_path, [(square((8, 8), "white"), square((32, 32), colour))
                              for colour in ("red", "green", "blue", "yellow")])
    item = setup(root).datasets["train"][0]
    assert item["condition"].shape == item["image"].shape == (3, 16, 16)
    assert item["condition"].min() == 1.0


def test_empty_after_skipping_unreadable_samples(tmp_path):
    root = fill50k(tmp_path, [(square(), None)] * 4)  # every target missing
    with pytest.raises(DataError, match="empty after skipping unreadable samples"):
        setup(root, skip_bad_samples=True)


def test_unreadable_sample_without_skip_names_its_file(tmp_path):
    root = fill50k(tmp_path, [(square(), square())] * 4)
    (root / "t2.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"t2\.png is corrupt.*skip_bad_samples"):
        setup(root, annotator="canny")  # precomputing conditions reads every image


def test_unknown_hf_column_lists_the_available_ones(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"image": [b"x"], "caption": ["a"]}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"data\.caption_column='text' is not a column.*"
                                        r"available columns: \['image', 'caption'\]"):
        setup(tmp_path / "d", layout="hf")
    with pytest.raises(DataError, match=r"conditioning_image_column.*data\.annotator"):
        setup(tmp_path / "d", layout="hf", caption_column="caption")


def test_corrupt_image_bytes_in_a_dataset_name_row_and_column(tmp_path):
    from datasets import Dataset, Features, Image as HFImage, Value

    good = io.BytesIO()
    square().save(good, "PNG")
    images = [{"bytes": good.getvalue(), "path": None}] * 4 + [{"bytes": b"junk", "path": None}]
    rows = {"image": images, "text": ["a"] * 5}
    features = Features({"image": HFImage(), "text": Value("string")})
    Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"image bytes are corrupt.*row 4 column 'image'"):
        setup(tmp_path / "d", layout="hf", annotator="canny")


def test_hub_dataset_id_offline_is_one_error(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"data\.root 'nobody-cnexp/none' could not be read"):
        setup("nobody-cnexp/none", layout="hf", cache_dir=str(tmp_path))


def test_bad_metadata_jsonl_line_and_missing_caption_column(tmp_path):
    square().save(tmp_path / "0.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"metadata\.jsonl:2 is not JSON"):
        setup(tmp_path, layout="captions", annotator="canny")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "0.png", "caption": "a"}\n')
    with pytest.raises(DataError, match=r"metadata\.jsonl:1 has no caption column 'text'; "
                                        r"available columns: \['caption'\]"):
        setup(tmp_path, layout="captions", annotator="canny")


def test_unknown_annotator_lists_them(tmp_path):
    root = fill50k(tmp_path, [(square(), square())] * 4)
    with pytest.raises(CnexpError, match=r"unknown annotator 'sobel'.*canny.*hed"):
        setup(root, annotator="sobel")


def test_hub_annotator_without_weights_names_it_and_the_offline_ones(tmp_path):
    root = fill50k(tmp_path, [(square(), square())] * 4)
    (tmp_path / "weights").mkdir()  # a local annotator path without the files: no download
    with pytest.raises(CnexpError, match=r"annotator 'hed' needs weights from .*weights.*"
                                         r"offline annotator: canny, content_shuffle"):
        setup(root, annotator="hed", annotator_path=str(tmp_path / "weights"))

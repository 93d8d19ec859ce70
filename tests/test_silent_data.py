"""Inputs that used to train on silently wrong data (issue 13, item 8): each is now read right,
warned about once, or refused with one message. docs/bad_input.md lists them."""
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TINY, compose_cfg
from PIL import Image

from cnexp.config import DataConfig
from cnexp.data.datamodule import TriplesDataModule
from cnexp.data.images import DataError, open_rgb
from cnexp.validate import ConfigError, validate


def setup(root, tokenizer=None, **overrides) -> TriplesDataModule:
    data = TriplesDataModule(DataConfig(root=str(root), resolution=16, **overrides),
                             tokenizer=tokenizer)
    data.setup()
    return data


def fill50k(root, records):
    """records: dicts of prompt.json lines; images named in them are written as red squares,
    each a shade apart (identical samples would be one content group for the split)."""
    root.mkdir(parents=True, exist_ok=True)
    for k, record in enumerate(records):
        for key in ("source", "target"):
            path = root / record[key]
            if ".." not in record[key] and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (16, 16), (255, k, 0)).save(path)
    (root / "prompt.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def sample(i, prompt="a red square", source=None, target=None):
    return {"source": source or f"s{i}.png", "target": target or f"t{i}.png", "prompt": prompt}


# --- 1. image modes: every decoder's output is the picture the file holds -------------------------

def grey_levels(path, condition=False):
    return np.array(open_rgb(path, origin="test", condition=condition)).astype(int)


def test_16_bit_png_keeps_its_grey_levels(tmp_path):
    levels = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    Image.fromarray(levels).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = grey_levels(tmp_path / "g16.png")
    assert (rgb[..., 0] == rgb[..., 2]).all()
    assert np.abs(rgb[..., 0] - levels / 257).max() <= 1  # not all white
    assert rgb.min() == 0 and rgb.max() == 255


def test_32_bit_integer_image_is_read_as_16_bit_and_out_of_range_refused(tmp_path):
    levels = np.linspace(0, 65535, 256).astype(np.int32).reshape(16, 16)
    Image.fromarray(levels).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    assert np.abs(grey_levels(tmp_path / "i.tif")[..., 1] - levels / 257).max() <= 1
    Image.fromarray(levels * 2).save(tmp_path / "big.tif")
    with pytest.raises(DataError, match=r"big\.tif .*integer values up to 131070.*outside "
                                        r"0\.\.65535.*8- or 16-bit PNG"):
        grey_levels(tmp_path / "big.tif")


def test_float_image_in_0_1_is_scaled_and_other_ranges_refused(tmp_path):
    levels = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    Image.fromarray(levels).save(tmp_path / "f.tif")
    assert np.abs(grey_levels(tmp_path / "f.tif")[..., 0] - levels * 255).max() <= 1
    Image.fromarray(levels * 100).save(tmp_path / "f100.tif")
    with pytest.raises(DataError, match=r"f100\.tif .*is a float image with values in "
                                        r"\[0, 100\]; cnexp reads float images as 0\.\.1"):
        grey_levels(tmp_path / "f100.tif")


def test_fully_transparent_pixels_become_the_background_of_their_role(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:8] = (10, 200, 30, 0)  # transparent: the colour stored there is whatever the encoder put
    rgba[8:] = (10, 200, 30, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    image, condition = grey_levels(tmp_path / "rgba.png"), grey_levels(tmp_path / "rgba.png", True)
    assert (image[:8] == 255).all() and (condition[:8] == 0).all()  # image: white; condition: black
    assert (image[8:] == (10, 200, 30)).all() and (condition[8:] == (10, 200, 30)).all()
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    la.save(tmp_path / "la.png")
    assert (grey_levels(tmp_path / "la.png")[:8] == 255).all()
    assert (grey_levels(tmp_path / "la.png")[8:] == 10).all()


def test_palette_images_with_and_without_a_transparent_entry(tmp_path):
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)  # 0 blue, 1 red
    palette.paste(0, (0, 0, 16, 8))
    palette.save(tmp_path / "p.png")
    assert (grey_levels(tmp_path / "p.png")[:8] == (0, 0, 255)).all()
    assert (grey_levels(tmp_path / "p.png")[8:] == (255, 0, 0)).all()
    palette.save(tmp_path / "pt.png", transparency=0)  # entry 0 (blue) is transparent
    assert (grey_levels(tmp_path / "pt.png")[:8] == 255).all()
    assert (grey_levels(tmp_path / "pt.png", condition=True)[:8] == 0).all()
    assert (grey_levels(tmp_path / "pt.png")[8:] == (255, 0, 0)).all()


def test_exif_orientation_is_applied_as_viewers_show_it(tmp_path):
    stored = np.zeros((8, 16, 3), np.uint8)
    stored[:, :8] = (255, 0, 0)  # left half red as stored; orientation 6: shown rotated 90° CW
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rot.png", exif=exif)
    shown = grey_levels(tmp_path / "rot.png")
    assert shown.shape == (16, 8, 3)
    assert (shown[:8] == (255, 0, 0)).all() and (shown[8:] == 0).all()  # red on top


def test_16_bit_condition_reaches_the_dataset_unchanged(tmp_path):
    root = fill50k(tmp_path / "d", [sample(i) for i in range(4)])
    depth = np.full((16, 16), 32768, np.uint16)  # mid-grey depth map
    for i in range(4):
        Image.fromarray(depth).save(root / f"s{i}.png")
    item = setup(root, test_fraction=0).datasets["train"][0]
    assert abs(float(item["condition"].mean()) - 0.5) < 0.01


# --- 2. captions the base's tokenizer cannot encode ----------------------------------------------

@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TINY), subfolder="tokenizer")


LONG = " ".join(["a red circle and a blue square"] * 6)  # 42 words


def test_unknown_words_and_overlong_captions_are_warned_once(tmp_path, tiny_tokenizer, caplog):
    prompts = ["a red circle", "a crimson circle", "a crimson square and a teal triangle", LONG]
    root = fill50k(tmp_path / "d", [sample(i, p) for i, p in enumerate(prompts)])
    with caplog.at_level(logging.WARNING, logger="cnexp"):
        data = setup(root, tokenizer=tiny_tokenizer, test_fraction=0)
        data.setup()
    warnings = caption_warnings(caplog)
    assert len(warnings) == 2, warnings
    unknown = next(w for w in warnings if "does not know" in w)
    assert "2 of 4 captions" in unknown
    assert "'crimson' (2 captions, split into c ri m s on)" in unknown and "'teal'" in unknown
    assert "use words in its vocabulary" in unknown and "base=sd15" in unknown
    long = next(w for w in warnings if "token" in w and w is not unknown)
    assert "1 of 4 captions" in long and "longer than the base's 32-token context" in long
    assert "longest: 44 tokens" in long and "shorten" in long


def test_clean_captions_give_no_warning(tmp_path, tiny_tokenizer, caplog):
    root = fill50k(tmp_path / "d", [sample(i, "a small red circle") for i in range(3)])
    with caplog.at_level(logging.WARNING, logger="cnexp"):
        setup(root, tokenizer=tiny_tokenizer, test_fraction=0)
    assert not caption_warnings(caplog)


def caption_warnings(caplog) -> list[str]:
    """The caption check's warnings (a set this small also has the batch fitted to its split)."""
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.getMessage().startswith("captions")]


def full_clip_tokenizer():
    """CLIP's own tokenizer (49408 entries, 77 tokens), built from open_clip's merge list."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges),
              "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                         model_max_length=77)


def test_sd_tokenizer_warns_truncation_at_77_but_knows_its_words(tmp_path, caplog):
    prompts = ["a crimson photorealistic circle", " ".join(["a crimson circle"] * 30)]
    root = fill50k(tmp_path / "d", [sample(i, p) for i, p in enumerate(prompts)])
    with caplog.at_level(logging.WARNING, logger="cnexp"):
        setup(root, tokenizer=full_clip_tokenizer(), test_fraction=0)
    warnings = caption_warnings(caplog)
    assert len(warnings) == 1 and "1 of 2 captions" in warnings[0]
    assert "77-token context" in warnings[0] and "longest: 92 tokens" in warnings[0]


# --- 3. small data sets run, evaluation adapts ----------------------------------------------------

def test_one_evaluation_caption_drops_the_conflicting_setting_with_a_warning(caplog):
    from cnexp.metrics.prompts import SETTINGS, prompt_settings

    with caplog.at_level(logging.WARNING, logger="cnexp"):
        settings = prompt_settings(["a red circle"], SETTINGS)
    assert list(settings) == ["none", "insufficient", "perfect"]
    assert "conflicting prompt setting needs at least 2 evaluation samples" in caplog.text
    with pytest.raises(Exception, match=r"eval\.conflict_shift=2 pairs every sample with itself"):
        prompt_settings(["a", "b"], SETTINGS, conflict_shift=2)  # a real mistake still fails


def test_fill50k_root_too_small_to_cut_splits_says_the_minimum(tmp_path):
    root = fill50k(tmp_path / "d", [sample(i) for i in range(2)])
    with pytest.raises(DataError, match=r"holds 2 samples: too few to cut a validation and a "
                                        r"test split from .* at least 3 .*data\.test_fraction=0"):
        setup(root)
    three = setup(fill50k(tmp_path / "e", [sample(i) for i in range(3)]))
    assert [len(three.datasets[s]) for s in ("train", "val", "test")] == [1, 1, 1]
    two = setup(root, test_fraction=0)
    assert [len(two.datasets[s]) for s in ("train", "val", "test")] == [1, 1, 0]


@pytest.mark.skipif(not (TINY / "model_index.json").exists(), reason="needs assets/tinyworld")
def test_tiny_data_set_trains_and_evaluates_end_to_end(tmp_path):
    cmd = [sys.executable, "run.py", f"hydra.run.dir={tmp_path / 'run'}",
           f"data.root={tmp_path / 'data'}", "data.train_size=8", "data.val_size=1",
           "data.test_size=1", "trainer.max_steps=2", "sampling.steps=2", "logger.mode=disabled"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]
    assert "eval/perfect/shape_iou" in final and not any("conflicting" in k for k in final)
    assert "evaluation set has 1 image" in proc.stdout + proc.stderr


# --- 4. seeds outside [0, 2^32) ------------------------------------------------------------------

@pytest.mark.parametrize("override", ["seed=-1", "data.split_seed=4294967296",
                                      "sampling.seed=-7"])
def test_seed_out_of_range_names_the_seed(override):
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')} is {value}; seeds must be "
                                          r"in \[0, 4294967295\]"):
        validate(compose_cfg([override]))


def test_run_py_negative_seed_exits_2_naming_seed(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", "seed=-1", f"hydra.run.dir={tmp_path}",
                           "logger.mode=disabled"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "seed is -1; seeds must be in [0, 4294967295]" in output and "Traceback" not in output


# --- 5. data paths outside data.root --------------------------------------------------------------

def test_prompt_json_path_outside_the_root_names_file_and_line(tmp_path):
    (tmp_path / "other").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "other" / "x.png")
    records = [sample(0), sample(1, target="../other/x.png")]
    root = fill50k(tmp_path / "d", records)
    with pytest.raises(DataError, match=r"prompt\.json:2: 'target' '\.\./other/x\.png' is "
                                        r"outside data\.root"):
        setup(root)
    records[1] = sample(1, source=str(tmp_path / "other" / "x.png"))  # absolute, outside
    fill50k(root, records)
    with pytest.raises(DataError, match=r"prompt\.json:2: 'source' '/.*x\.png' is outside"):
        setup(root)
    records[1] = sample(1, source=str(root / "s0.png"))  # absolute, inside: fine
    setup(fill50k(root, records), test_fraction=0)


def test_symlink_inside_the_root_is_followed(tmp_path):
    (tmp_path / "store").mkdir()
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "store" / "x.png")
    root = fill50k(tmp_path / "d", [sample(i) for i in range(2)])
    os.symlink(tmp_path / "store", root / "linked")
    fill50k(root, [sample(0), sample(1, target="linked/x.png")])
    source = setup(root, test_fraction=0).datasets["train"].source
    assert source.load(1).image.getpixel((0, 0)) == (0, 0, 255)  # blue, via the link


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_captions_metadata_path_outside_the_root(tmp_path, kind):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (16, 16)).save(root / "0.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    if kind == "jsonl":
        (root / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a"}\n'
                                             '{"file_name": "../x.png", "text": "b"}\n')
    else:
        (root / "metadata.csv").write_text("file_name,text\n0.png,a\n../x.png,b\n")
    line = 2 if kind == "jsonl" else 3
    with pytest.raises(DataError, match=rf"metadata\.{kind}:{line}: 'file_name' '\.\./x\.png' "
                                        r"is outside data\.root"):
        setup(root, layout="captions", annotator="canny")


# --- 6. sweep jobs that differ only by a knob ----------------------------------------------------

def test_sweep_job_names_carry_the_swept_knobs(monkeypatch, tmp_path):
    import runpy
    import types

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from cnexp.analysis.runs import JOB_DIR_NAME
    from cnexp.run.naming import wandb_identity

    def fake_train(cfg, signals=None):
        (tmp_path / "names").mkdir(exist_ok=True)
        out = os.path.basename(cfg.paths.output_dir)
        (tmp_path / "names" / out).write_text(wandb_identity(cfg)["name"])

    monkeypatch.setitem(sys.modules, "cnexp.train", types.SimpleNamespace(train=fake_train))
    monkeypatch.setattr(sys, "argv", ["run.py", "-m", "control.branch=copy,lite",
                                      "data.root=/a/b,/c/d", "trainer.max_steps=3",
                                      f"hydra.sweep.dir={tmp_path / 'sweep'}",
                                      "logger.mode=disabled"])
    try:
        runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
    dirs = sorted(d.name for d in (tmp_path / "sweep").iterdir() if d.is_dir())
    # the swept knobs, not the constant trainer.max_steps; "/" made safe, a hash keeps it unique
    jobs = [("copy", "a", "b"), ("copy", "c", "d"), ("lite", "a", "b"), ("lite", "c", "d")]
    expected = [rf"{i}_baseline-s0_branch={branch}_root=-{a}-{b}~[0-9a-f]{{6}}"
                for i, (branch, a, b) in enumerate(jobs)]
    assert len(dirs) == 4 and all(re.fullmatch(e, d) for e, d in zip(expected, dirs)), dirs
    names = {p.name: p.read_text() for p in (tmp_path / "names").iterdir()}
    assert all(names[d] == d.split("_", 1)[1] for d in dirs)  # W&B name = the directory's
    for name in dirs:  # runs.py still reads ablation and seed from the directory name
        match = JOB_DIR_NAME.match(name)
        assert match and (match["ablation"], match["seed"]) == ("baseline", "0")
    assert JOB_DIR_NAME.match("3_no_zero_conv-s12")["ablation"] == "no_zero_conv"


def test_every_layout_lists_its_captions_without_decoding_images(tmp_path):
    from datasets import Dataset

    from cnexp.data.captions import CaptionsSource
    from cnexp.data.hf import HFSource, load_hf_splits

    Dataset.from_dict({"image": [b"not decoded"] * 2, "conditioning_image": [b"x"] * 2,
                       "text": [["a crimson circle"], ["two", "captions"]]}).save_to_disk(
        str(tmp_path / "hf"))
    table = load_hf_splits(str(tmp_path / "hf"), None, None)["train"]
    source = HFSource(table, str(tmp_path / "hf"), "train", "image", "conditioning_image", "text")
    assert [source.captions(i) for i in range(2)] == [["a crimson circle"], ["two", "captions"]]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "0.png").write_bytes(b"not an image either")
    (tmp_path / "c" / "0.txt").write_text("one\ntwo\n")
    assert CaptionsSource(tmp_path / "c").captions(0) == ["one", "two"]

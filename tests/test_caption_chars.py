"""Captions and conditions the data check used to pass in silence. Issue 34, item 11: captions of
whitespace only counted as neither empty nor warned (they tokenize as ""); emoji became byte
pieces with no word, unreported; a condition at half its target's size was upscaled silently
(only the target's upscale was reported)."""
import json
import logging

import pytest
from PIL import Image, ImageDraw

from cnexp.config import DataConfig
from cnexp.data.caption_check import caption_warnings
from cnexp.data.datamodule import TriplesDataModule
from cnexp.data.images import DataError
from cnexp.tinyworld.shapes import scene_at
from test_silent_data import TINY


def write_fill50k(root, prompts, condition_side=16):
    """One sample per prompt: a 16x16 target (a distinct disc each), its condition at
    condition_side px."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, prompt in enumerate(prompts):
        target = Image.new("RGB", (16, 16), (40 * k % 256, 90, 200))
        ImageDraw.Draw(target).ellipse([k % 5, k % 3, 8 + k % 5, 8 + k % 4], fill="white")
        target.save(root / f"t{k}.png")
        Image.new("RGB", (condition_side,) * 2, "white").save(root / f"s{k}.png")
        lines.append(json.dumps({"source": f"s{k}.png", "target": f"t{k}.png",
                                 "prompt": prompt}))
    (root / "prompt.json").write_text("\n".join(lines) + "\n")
    return root


def setup(root, tokenizer=None, **overrides) -> TriplesDataModule:
    data = TriplesDataModule(DataConfig(root=str(root), resolution=16, test_fraction=0,
                                        **overrides), tokenizer=tokenizer)
    data.setup()
    return data


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_whitespace_only_captions_are_counted_as_empty(tmp_path, caplog):
    root = write_fill50k(tmp_path / "d", ["   ", "\t", "a red circle", "a blue square"])
    with caplog.at_level(logging.WARNING, logger="cnexp"):
        setup(root)
    empty = [w for w in warnings_of(caplog) if "have no caption" in w]
    assert len(empty) == 1 and "2 of 4 sample(s) have no caption (or only whitespace)" in empty[0]
    assert "t0.png" in empty[0] and "t1.png" in empty[0]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TINY), subfolder="tokenizer")


def test_emoji_are_reported_like_unknown_words(tiny_tokenizer):
    captions = ["a red circle 😀", "a blue square 😀", "a green triangle ™", "a red circle",
                "   "]
    found = caption_warnings(tiny_tokenizer, captions)
    assert len(found) == 1, found  # the whitespace caption is an empty one, not checked here
    message = found[0]
    assert "3 of 4 captions use 2 character(s) the base's tokenizer cannot represent" in message
    assert "'😀' (2 captions, 4 byte pieces ð Ł ĺ Ģ)" in message and "'™' (1 caption" in message
    assert "write the word instead" in message and "base=sd15" in message


def test_a_lone_latin_1_letter_is_reported_though_its_byte_token_exists(tiny_tokenizer):
    # '²' is also the byte encoder's character for 0xB2, so '²</w>' is in the vocabulary; the
    # character itself is two UTF-8 bytes and tokenizes to two pieces
    found = caption_warnings(tiny_tokenizer, ["a red circle 2²", "a red circle"])
    assert len(found) == 1 and "'²' (1 caption, split into Â ²)" in found[0], found


def test_emoji_warning_reaches_the_run_log_once(tmp_path, tiny_tokenizer, caplog):
    root = write_fill50k(tmp_path / "d", [scene_at(0, k).caption() + " 🎉" for k in range(4)])
    with caplog.at_level(logging.WARNING, logger="cnexp"):
        setup(root, tokenizer=tiny_tokenizer)
    found = [w for w in warnings_of(caplog) if "cannot represent" in w]
    assert len(found) == 1 and "4 of 4 captions" in found[0] and "'🎉' (4 captions" in found[0]


def test_a_condition_at_half_its_targets_size_is_reported(tmp_path, caplog):
    root = write_fill50k(tmp_path / "d", [f"a red circle {k}" for k in range(4)], 8)
    with caplog.at_level(logging.WARNING, logger="cnexp"):
        data = setup(root)
    found = [w for w in warnings_of(caplog) if "condition(s) are smaller" in w]
    assert len(found) == 1, warnings_of(caplog)
    assert ("4 of 4 condition(s) are smaller than their target and data.resolution=16 and are "
            "upscaled (smallest 8x8)") in found[0]
    assert not [w for w in warnings_of(caplog) if "target(s) are smaller" in w]
    assert data.datasets["train"][0]["condition"].shape == (3, 16, 16)


def test_a_condition_below_the_minimum_size_stops_like_a_target(tmp_path):
    root = write_fill50k(tmp_path / "d", [f"a red circle {k}" for k in range(4)], 2)
    with pytest.raises(DataError, match=r"4 sample\(s\) have a condition whose shorter side is "
                                        r"below data\.min_image_size=4 .*t0\.png.*"
                                        r"skip_bad_samples=true"):
        setup(root)
    data = setup(root, skip_bad_samples=True, min_image_size=1)  # a lower minimum: warned only
    assert len(data.datasets["train"]) + len(data.datasets["val"]) == 4

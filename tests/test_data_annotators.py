"""The annotator interface (shared with evaluation) and the on-disk condition cache."""
import logging
import os
import socket
import sys
import types
from urllib.parse import urlparse

import cv2
import numpy as np
import pytest
from PIL import Image

from cnexp.config import DataConfig
from cnexp.data.annotators import AnnotatorError, get_annotator
from cnexp.data.cache import ConditionCache
from cnexp.data.datamodule import TriplesDataModule


def shapes_image(size=64, colour=(200, 40, 40)) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    cv2.circle(image, (size // 2, size // 2), size // 4, colour, -1)
    return image


def hub_reachable() -> bool:
    import huggingface_hub

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
        return False
    host = urlparse(huggingface_hub.constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("name", ["canny", "content_shuffle", "lineart_standard"])
def test_offline_annotators_keep_the_image_size(name):
    annotate = get_annotator(name)
    for image in (shapes_image(48), Image.fromarray(shapes_image(48)).convert("L")):
        condition = annotate(image)
        assert condition.dtype == np.uint8 and condition.shape == (48, 48, 3)
    assert annotate(shapes_image(48)).any()


def test_canny_is_opencv_canny_with_the_configured_thresholds():
    image = shapes_image(64)
    loose = get_annotator("canny", low_threshold=50, high_threshold=150)(image)
    assert np.array_equal(loose[..., 0], cv2.Canny(image, 50, 150)) and loose.any()
    strict = get_annotator("canny", low_threshold=4000, high_threshold=5000)(image)
    assert np.array_equal(strict[..., 0], cv2.Canny(image, 4000, 5000))
    assert (strict > 0).sum() < (loose > 0).sum()


def test_content_shuffle_is_seeded_per_image():
    first, second = get_annotator("content_shuffle"), get_annotator("content_shuffle", seed=1)
    image = shapes_image(64)
    state = np.random.get_state()[1].copy()
    assert np.array_equal(first(image), first(image))
    assert not np.array_equal(first(image), second(image))
    assert np.array_equal(np.random.get_state()[1], state)  # global RNG untouched


def test_annotator_params_are_checked():
    with pytest.raises(AnnotatorError, match="no parameter.*'low'.*low_threshold"):
        get_annotator("canny", low=1)


@pytest.mark.parametrize("installed, reason", [
    (None, "needs mediapipe"),  # not installed: importing it fails
    (types.SimpleNamespace(__version__="1.0.0"), "mediapipe 1.0.0 has no mp.solutions")])
def test_mediapipe_face_without_a_usable_mediapipe_names_the_fix(monkeypatch, installed, reason):
    monkeypatch.setitem(sys.modules, "mediapipe", installed)
    with pytest.raises(AnnotatorError, match=reason) as err:
        get_annotator("mediapipe_face")
    assert "pip install 'mediapipe==0.10.21'" in str(err.value)
    assert "canny" in str(err.value)  # and the offline annotators that need no mediapipe


@pytest.mark.hub
def test_hub_annotator_loads_when_the_hub_is_reachable():
    if not hub_reachable():
        pytest.skip("the hub is not reachable (offline): hed's weights cannot be downloaded")
    assert get_annotator("hed")(shapes_image(64)).shape == (64, 64, 3)


def test_cache_key_depends_on_annotator_params_and_image(tmp_path):
    canny, other = get_annotator("canny"), get_annotator("canny", low_threshold=10)
    assert canny.key == get_annotator("canny").key and canny.key != other.key
    cache = ConditionCache(canny, tmp_path)
    a, b = shapes_image(32), shapes_image(32, colour=(0, 0, 250))
    assert cache.path_for(a) != cache.path_for(b)
    cache(a), cache(a), cache(b)
    assert (cache.hits, cache.computed) == (1, 2)
    cache.path_for(b).write_bytes(b"truncated")  # a damaged entry is recomputed, not trusted
    assert np.array_equal(cache(b), canny(b)) and cache.computed == 3


def test_canny_conditions_hit_the_cache_on_the_second_run(tmp_path, caplog):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(6):
        Image.fromarray(shapes_image(32, colour=(40 * i, 200, 40))).save(root / f"{i}.png")
    cfg = DataConfig(root=str(root), layout="captions", annotator="canny", resolution=32,
                     cache_dir=str(tmp_path / "cache"), val_fraction=0.2, test_fraction=0.2)
    first = TriplesDataModule(cfg)
    first.setup()
    assert (first.conditions.hits, first.conditions.computed) == (0, 6)
    first_items = [first.datasets["train"][i]["condition"] for i in range(4)]
    assert first.conditions.hits == 4  # the epoch reads the precomputed conditions
    with caplog.at_level(logging.INFO, logger="cnexp"):
        second = TriplesDataModule(cfg, seed=1)
        second.setup()
    assert (second.conditions.hits, second.conditions.computed) == (6, 0)
    assert "6 hits, 0 computed" in caplog.text
    for i, condition in enumerate(first_items):
        assert (second.datasets["train"][i]["condition"] == condition).all()
    cached = list((tmp_path / "cache" / "conditions").glob("canny-*/*.png"))
    assert len(cached) == 6

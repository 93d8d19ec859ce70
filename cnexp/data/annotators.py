"""Condition annotators (controlnet-aux) behind one interface, shared by data and evaluation.

    annotate = get_annotator("canny", low_threshold=100, high_threshold=200)
    condition = annotate(image)  # PIL or uint8 (H, W, 3) -> uint8 (H, W, 3), same H and W

The data module computes conditions for image-only datasets with it; control fidelity re-detects
the condition on generated images with the same call. Hub-weight annotators load once, at
`get_annotator`, so a missing download fails before training starts, not in a worker.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import warnings
import zlib
from typing import Any

import cv2
import numpy as np
from PIL import Image

from cnexp.errors import CnexpError
from cnexp.quiet import add_warning_filters

OFFLINE_ANNOTATORS = ("canny", "content_shuffle", "lineart_standard", "mediapipe_face")
# name -> controlnet_aux class whose from_pretrained reads DEFAULT_WEIGHTS (or a local copy)
HUB_ANNOTATORS = {
    "hed": "HEDdetector", "pidinet": "PidiNetDetector", "midas": "MidasDetector",
    "normalbae": "NormalBaeDetector", "openpose": "OpenposeDetector", "mlsd": "MLSDdetector",
    "lineart": "LineartDetector", "lineart_anime": "LineartAnimeDetector", "zoe": "ZoeDetector",
    "leres": "LeresDetector",
}
OFFLINE_CLASSES = {"canny": "CannyDetector", "content_shuffle": "ContentShuffleDetector",
                   "lineart_standard": "LineartStandardDetector",
                   "mediapipe_face": "MediapipeFaceDetector"}
DEFAULT_WEIGHTS = "lllyasviel/Annotators"  # the authors' annotator weights on the hub
MIN_DETECT_RESOLUTION = 64  # controlnet-aux rounds sizes to multiples of 64
# set by us on every call, or meaningless for a callable that returns an array
MANAGED_ARGS = {"self", "input_image", "img", "image", "output_type", "return_pil", "kwargs"}


class AnnotatorError(CnexpError):
    pass


def _controlnet_aux():
    """Imported here, not at the top: the default run needs no annotator, and the import takes
    seconds and warns (mediapipe, timm's renames: the filters cnexp/quiet.py lists, applied
    here too, where a caller such as pytest has reset the process's filters)."""
    with warnings.catch_warnings():
        add_warning_filters()
        import controlnet_aux
    return controlnet_aux


def _check_mediapipe() -> None:
    """controlnet-aux's face annotator uses mediapipe's legacy `mp.solutions` API."""
    others = ", ".join(a for a in OFFLINE_ANNOTATORS if a != "mediapipe_face")
    fix = ("install a mediapipe release that still ships mp.solutions (0.10.21 does; 1.x does "
           "not, and 0.10.21 needs numpy<2): pip install 'mediapipe==0.10.21', or use another "
           f"offline annotator: {others}")
    try:
        import mediapipe
    except ImportError as err:
        raise AnnotatorError(f"annotator 'mediapipe_face' needs mediapipe ({err}): {fix}") from None
    if not hasattr(mediapipe, "solutions"):
        raise AnnotatorError(f"annotator 'mediapipe_face': mediapipe {mediapipe.__version__} has "
                             f"no mp.solutions, which controlnet-aux needs: {fix}")


def _load_detector(name: str, pretrained: str | None):
    aux = _controlnet_aux()
    if name in OFFLINE_CLASSES:
        if name == "mediapipe_face":
            _check_mediapipe()
        return getattr(aux, OFFLINE_CLASSES[name])()
    source = pretrained or DEFAULT_WEIGHTS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return getattr(aux, HUB_ANNOTATORS[name]).from_pretrained(source)
    except Exception as err:  # hub, network and file errors all mean: the weights are not here
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise AnnotatorError(
            f"annotator '{name}' needs weights from '{source}' and could not load them ({reason}). "
            f"Run once online (they are then cached), or put the files of {DEFAULT_WEIGHTS} in a "
            "directory and pass it (data.annotator_path=DIR), or use an offline annotator: "
            f"{', '.join(OFFLINE_ANNOTATORS)}") from None


def _parameters(detector) -> list[str]:
    return [p for p in inspect.signature(detector.__call__).parameters if p not in MANAGED_ARGS]


def _to_hwc3(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


class Annotator:
    """A callable condition detector: image (PIL or uint8 HWC) -> uint8 (H, W, 3) condition."""

    def __init__(self, name: str, detector, params: dict[str, Any]):
        self.name, self.detector, self.params = name, detector, dict(params)
        self.seed = int(self.params.pop("seed", 0))  # content_shuffle's warp is random
        accepted = set(inspect.signature(detector.__call__).parameters)
        self._call_args = {"output_type": "np"} if "output_type" in accepted else {}
        self._size_args = [a for a in ("detect_resolution", "image_resolution")
                           if a in accepted and a not in self.params]

    @property
    def key(self) -> str:
        """Stable id of (annotator, parameters) for cache keys: equal params, equal key."""
        blob = json.dumps({"name": self.name, "seed": self.seed, **self.params}, sort_keys=True)
        return f"{self.name}-{hashlib.sha1(blob.encode()).hexdigest()[:12]}"

    def __call__(self, image) -> np.ndarray:
        rgb = _to_hwc3(np.array(image.convert("RGB")) if isinstance(image, Image.Image) else image)
        h, w = rgb.shape[:2]
        # default: detect at the image's own size, so the condition matches its pixel grid
        size = max(MIN_DETECT_RESOLUTION, min(h, w))
        args = {**self._call_args, **{a: size for a in self._size_args}, **self.params}
        if self.name == "content_shuffle":
            state = np.random.get_state()  # a seeded warp per image, without touching global state
            np.random.seed((zlib.crc32(rgb.tobytes()) ^ self.seed) & 0xFFFFFFFF)
            try:
                out = self.detector(rgb, **args)
            finally:
                np.random.set_state(state)
        else:
            out = self.detector(rgb, **args)
        out = _to_hwc3(np.array(out))
        if out.shape[:2] != (h, w):
            out = cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)
        return out


def get_annotator(name: str, pretrained: str | None = None, **params) -> Annotator:
    """The named controlnet-aux annotator with its parameters (e.g. canny: low_threshold,
    high_threshold). `pretrained`: hub id or local directory of the hub-weight annotators."""
    known = (*OFFLINE_ANNOTATORS, *HUB_ANNOTATORS)
    if name not in known:
        raise AnnotatorError(f"unknown annotator '{name}': use one of {', '.join(known)} "
                             f"(offline: {', '.join(OFFLINE_ANNOTATORS)})")
    if pretrained is None and os.environ.get("CNEXP_ANNOTATORS"):
        pretrained = os.environ["CNEXP_ANNOTATORS"]  # a shared local copy of the weights
    detector = _load_detector(name, pretrained)
    allowed = _parameters(detector)
    unknown = sorted(set(params) - set(allowed) - {"seed"})
    if unknown:
        raise AnnotatorError(f"annotator '{name}' has no parameter(s) {unknown}; its parameters: "
                             f"{', '.join(allowed)} (data.annotator_params)")
    return Annotator(name, detector, params)

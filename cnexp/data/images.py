"""Reading images with errors that name the file; the resize/crop shared by image and condition."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cnexp.errors import CnexpError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
ASPECT_TOLERANCE = 0.02  # relative: a condition at another scale of the same frame is fine


class DataError(CnexpError):
    pass


class UnreadableImage(DataError):
    """A missing or corrupt image file: what data.skip_bad_samples may leave out."""


@dataclass
class Sample:
    """One raw sample from any layout: RGB image, its condition (None: to be annotated),
    its captions (one is picked per use; may be [""]) and where it came from, for errors."""
    image: Image.Image
    condition: Image.Image | None
    captions: list[str] = field(default_factory=lambda: [""])
    origin: str = ""


def file_stamps(root: Path, names) -> list:
    """(name, size, mtime_ns) of each file under root, None for a missing one: a cheap stand-in
    for the files' content (what make and ccache key on) when fingerprinting a dataset."""
    stamps = []
    for name in names:
        try:
            st = (Path(root) / name).stat()
            stamps.append((str(name), st.st_size, st.st_mtime_ns))
        except OSError:
            stamps.append((str(name), None, None))
    return stamps


def open_rgb(source: str | Path | bytes, origin: str) -> Image.Image:
    """Decode a path or encoded bytes to RGB (grey, palette and RGBA converted)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise UnreadableImage(f"image file {source} is missing ({origin}): restore the file "
                              "or fix the entry that names it") from None
    except OSError as err:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        name = "image bytes are" if isinstance(source, bytes) else f"image file {source} is"
        raise UnreadableImage(f"{name} corrupt or not an image ({origin}; {err}): replace "
                              "it, or set data.skip_bad_samples=true to leave such samples "
                              "out") from None


def match_sizes(image: Image.Image, condition: Image.Image, origin: str) -> Image.Image:
    """The condition at the image's size, when it is the same frame at another scale."""
    if condition.size == image.size:
        return condition
    (w, h), (cw, ch) = image.size, condition.size
    if abs(w / h - cw / ch) > ASPECT_TOLERANCE * (w / h):
        raise DataError(f"{origin}: condition is {cw}x{ch} but image is {w}x{h}; their aspect "
                        "ratios differ, so no resize or crop can align them pixel for pixel. "
                        "Store the condition at the image's size (or the same aspect ratio)")
    return condition.resize(image.size, Image.BICUBIC)


def resize_shorter(img: Image.Image, resolution: int) -> np.ndarray:
    """uint8 (H, W, 3) with the shorter side scaled to `resolution` (both sides >= it)."""
    w, h = img.size
    if min(w, h) != resolution:
        scale = resolution / min(w, h)
        img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                         Image.BICUBIC)
    return np.array(img)  # a writable copy, for torch.from_numpy


def crop_box(height: int, width: int, resolution: int, offset: tuple[float, float] | None):
    """(top, left) of a resolution x resolution crop; offset=None is the center, else (u, v) in
    [0, 1) picks it at random along each axis."""
    if offset is None:
        return (height - resolution) // 2, (width - resolution) // 2
    u, v = offset
    return (min(int(u * (height - resolution + 1)), height - resolution),
            min(int(v * (width - resolution + 1)), width - resolution))


def caption_list(value, where: str, field: str) -> list[str]:
    """A caption field as a list (one or several captions per image; null or [] -> [""])."""
    if value is None:
        return [""]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(c, str) for c in value):
        return value or [""]
    raise DataError(f"{where}: {field} must be a string or a list of strings, "
                    f"got {type(value).__name__}")

"""Reading images with errors that name the file; the resize/crop shared by image and condition."""
from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

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


def open_rgb(source: str | Path | bytes, origin: str, condition: bool = False) -> Image.Image:
    """Decode a path or encoded bytes to RGB as a viewer shows it (see to_rgb)."""
    what = "image bytes" if isinstance(source, bytes) else f"image file {source}"
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return to_rgb(img, f"{what} ({origin})", condition)
    except FileNotFoundError:
        raise UnreadableImage(f"{what} is missing ({origin}): restore the file or fix the "
                              "entry that names it") from None
    except Image.DecompressionBombError as err:  # not an OSError: it would be a traceback
        raise UnreadableImage(f"{what} is too large to decode safely ({origin}; {err}): "
                              "downscale it, or set data.skip_bad_samples=true to leave such "
                              "samples out") from None
    # PIL's UnidentifiedImageError and truncated files are OSErrors; some decoders raise
    # SyntaxError or struct.error on a damaged header
    except (OSError, SyntaxError, struct.error) as err:
        verb = "are" if isinstance(source, bytes) else "is"
        raise UnreadableImage(f"{what} {verb} corrupt or not an image ({origin}; {err}): "
                              "replace it, or set data.skip_bad_samples=true to leave such "
                              "samples out") from None


# EXIF orientations that turn the stored frame by 90 degrees (exif_transpose swaps its sides)
TURNED = (5, 6, 7, 8)


def image_size(source: str | Path | bytes, origin: str) -> tuple[int, int]:
    """(width, height) that open_rgb would give, read from the file's header only (no pixels
    decoded): training from cached latents needs the image's size, not the image."""
    what = "image bytes" if isinstance(source, bytes) else f"image file {source}"
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            (w, h), orientation = img.size, img.getexif().get(0x0112, 1)  # 0x0112: Orientation
    except FileNotFoundError:
        raise UnreadableImage(f"{what} is missing ({origin}): restore the file or fix the "
                              "entry that names it") from None
    except (OSError, SyntaxError, struct.error, Image.DecompressionBombError) as err:
        raise UnreadableImage(f"{what} is corrupt or not an image ({origin}; {err}): replace "
                              "it, or set data.skip_bad_samples=true to leave such samples "
                              "out") from None
    return (h, w) if orientation in TURNED else (w, h)


# Pillow's convert("RGB") clips 16- and 32-bit values at 255 (a 16-bit PNG turns white) and
# reads floats as 0..255: the modes below are scaled explicitly, each by its fixed range.
SIXTEEN_BIT = 65535


def _grey_to_l(img: Image.Image, name: str) -> Image.Image:
    values = np.asarray(img)
    if img.mode == "F":
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 1:
            raise DataError(f"{name} is a float image with values in [{low:g}, {high:g}]; cnexp "
                            "reads float images as 0..1 (black..white) and cannot know this "
                            "one's range: save it as an 8- or 16-bit PNG")
        return Image.fromarray(np.round(values * 255).astype(np.uint8))
    # I;16* is 16-bit by its mode; I (32-bit) is read as 16-bit, as Pillow < 10 opened 16-bit PNGs
    values = values.astype(np.int64)
    if img.mode == "I" and (values.min() < 0 or values.max() > SIXTEEN_BIT):
        raise DataError(f"{name} is a 32-bit integer image with integer values up to "
                        f"{values.max()} (from {values.min()}), outside 0..65535 (16-bit), the "
                        "range cnexp reads it in: save it as an 8- or 16-bit PNG")
    return Image.fromarray(((values * 255 + SIXTEEN_BIT // 2) // SIXTEEN_BIT).astype(np.uint8))


def to_rgb(img: Image.Image, name: str, condition: bool = False) -> Image.Image:
    """RGB as a viewer shows `img`: EXIF orientation applied, 16-bit/32-bit/float grey scaled to
    8 bits, and fully transparent pixels (whose stored colour is arbitrary) set to the role's
    background: white for an image, black (ControlNet's convention) for a condition. Partly
    transparent pixels keep their colour. `name` says which file, for errors."""
    stored = img.mode  # kept in the result's info: the data check reports the modes met
    img = ImageOps.exif_transpose(img)
    if img.mode == "F" or img.mode == "I" or img.mode.startswith("I;16"):
        img = _grey_to_l(img, name)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if not has_alpha:
        rgb = img.convert("RGB")
    else:
        rgba = np.array(img.convert("RGBA"))
        rgba[rgba[..., 3] == 0, :3] = 0 if condition else 255
        rgb = Image.fromarray(rgba[..., :3])
    rgb.info["cnexp_mode"] = stored
    return rgb


def read_text(path: Path) -> str:
    """A text file of a data set (index, metadata, caption sidecar) as UTF-8; a byte-order mark
    (Windows editors write one) is read, not refused; another encoding is one message."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line} is not UTF-8 (byte {data[err.start]:#04x} at offset "
                        f"{err.start}): save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                        ) from None


def path_in_root(root: Path, value, where: str, field: str) -> Path:
    """root/value, refused when it leaves root: a `../other/x.png` in an index would read
    another data set's (or split's) file. Decided on the path as written (normalised, links not
    resolved), so a symlink inside the root may point anywhere: placing it is deliberate."""
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: {field} must be a file path (a non-empty string), got "
                        f"{value!r}")
    base = os.path.normpath(os.path.abspath(root))
    path = os.path.normpath(os.path.join(base, value))
    if os.path.commonpath([base, path]) != base:
        raise DataError(f"{where}: {field} '{value}' is outside data.root '{root}': paths in a "
                        "data set's index must name files under its root; copy or link the "
                        "file into the root, or point data.root at a folder holding both")
    return Path(path)


def match_sizes(image: Image.Image | tuple[int, int], condition: Image.Image,
                origin: str) -> Image.Image:
    """The condition at the image's size (the image, or its (width, height)), when it is the
    same frame at another scale."""
    size = image if isinstance(image, tuple) else image.size
    if condition.size == size:
        return condition
    (w, h), (cw, ch) = size, condition.size
    if abs(w / h - cw / ch) > ASPECT_TOLERANCE * (w / h):
        raise DataError(f"{origin}: condition is {cw}x{ch} but image is {w}x{h}; their aspect "
                        "ratios differ, so no resize or crop can align them pixel for pixel. "
                        "Store the condition at the image's size (or the same aspect ratio)")
    return condition.resize(size, Image.BICUBIC)


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

"""Image files: decoding at native depth, conversion to 8-bit RGB, header sizes, the one resize rule, PNG writes.

Images of any common storage form load as 8-bit RGB: gray is replicated to three channels, alpha is dropped, and
16-bit or float intensities are mapped to 0..255 by an ``Intensity`` mode (``data.intensity``):

* ``auto`` (default): 8-bit as stored; 16-bit files whose values stay ≤ 4095 (12-bit data in a 16-bit container:
  CT, X-ray, fluorescence) scaled by 255/4095, other 16-bit files by 1/257 (65535 → 255); float images in [0, 1]
  ×255, other float images min-max.
* ``full_range``: the container's range (÷257 for 16-bit, ×255 for float in [0, 1]); what the released code's
  8-bit conversion amounts to.
* ``minmax``: each image's own minimum → 0 and maximum → 255.
* ``percentile``: each image's ``percentiles`` (default 0.5 and 99.5) → 0 and 255, clipped beyond (a window robust
  to a few hot or dead pixels).

The per-image modes stretch every image to the full range (contrast between images is not kept); ``auto`` and
``full_range`` keep it. Values are never wrapped: everything is scaled, then clipped to 0..255 and rounded.

Resizing follows one rule everywhere (training samples, pair
files, backgrounds, segmenter inputs, feature thumbnails): ``INTER_AREA`` (an average: no aliasing) when neither
side grows, bicubic when any side grows, and the array itself when the size already matches.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from ldm.fileio import write_bytes_atomic

import cv2
import numpy as np
from PIL import Image

__all__ = ["IMAGE_SUFFIXES", "INTENSITY_MODES", "Intensity", "aspect_ratios_differ", "decode_image", "header_size",
           "image_to_rgb8", "intensity_to_uint8", "parse_intensity", "read_image_rgb", "resize_image", "write_png"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
INTENSITY_MODES = ("auto", "full_range", "minmax", "percentile")
TWELVE_BIT_MAX = 4095


@dataclass(frozen=True)
class Intensity:
    """How 16-bit and float intensities become 0..255 (module docstring); ``percentiles`` for ``percentile``."""

    mode: str = "auto"
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        if self.mode not in INTENSITY_MODES:
            raise ValueError(f"intensity mode {self.mode!r} is not one of {', '.join(INTENSITY_MODES)}")
        low, high = (float(v) for v in self.percentiles)
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"intensity percentiles {self.percentiles} must satisfy 0 <= low < high <= 100")
        object.__setattr__(self, "percentiles", (low, high))

    def __str__(self) -> str:
        if self.mode == "percentile":
            return f"percentile:{self.percentiles[0]:g},{self.percentiles[1]:g}"
        return self.mode


AUTO = Intensity()


def parse_intensity(spec: str | Intensity | None) -> Intensity:
    """``auto``, ``full_range``, ``minmax``, ``percentile`` or ``percentile:LOW,HIGH`` → ``Intensity`` (None: auto)."""
    if spec is None:
        return AUTO
    if isinstance(spec, Intensity):
        return spec
    mode, _, rest = str(spec).partition(":")
    if not rest:
        return Intensity(mode)
    if mode != "percentile":
        raise ValueError(f"intensity {spec!r}: only 'percentile' takes values (percentile:LOW,HIGH)")
    try:
        low, high = (float(v) for v in rest.split(","))
    except ValueError:
        raise ValueError(f"intensity {spec!r}: expected percentile:LOW,HIGH, e.g. percentile:0.5,99.5") from None
    return Intensity("percentile", (low, high))


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.clip(np.rint((values - low) * scale), 0, 255).astype(np.uint8)


def intensity_to_uint8(array: np.ndarray, intensity: Intensity | str | None = None,
                       path: str | Path = "<array>") -> np.ndarray:
    """A decoded image's values (uint8, uint16 or float; any channel count) mapped to uint8 by ``intensity``."""
    intensity = parse_intensity(intensity)
    kind = array.dtype
    if kind not in (np.uint8, np.uint16) and not np.issubdtype(kind, np.floating):
        raise ValueError(f"image {path}: pixel type {kind} is not supported (expected 8- or 16-bit integers or "
                         "float)")
    values = array.astype(np.float64) if kind != np.uint8 else array
    if kind != np.uint8 and not np.isfinite(values).all():
        raise ValueError(f"image {path}: holds NaN or infinite values")
    mode = intensity.mode
    if mode == "minmax":
        return _stretch(values, float(values.min()), float(values.max()))
    if mode == "percentile":
        low, high = np.percentile(values, intensity.percentiles)
        return _stretch(values, float(low), float(high))
    if kind == np.uint8:
        return array
    if kind == np.uint16:
        if mode == "auto" and int(array.max()) <= TWELVE_BIT_MAX:
            return _stretch(values, 0.0, float(TWELVE_BIT_MAX))
        return (array // 257).astype(np.uint8)  # 65535 → 255 exactly, monotone, as before the modes existed
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0.0 and hi <= 1.0:
        return _stretch(values, 0.0, 1.0)
    if mode == "auto":
        return _stretch(values, lo, hi)
    raise ValueError(f"image {path}: float values in [{lo:g}, {hi:g}], not [0, 1]; set data.intensity: minmax or "
                     "percentile")


def decode_image(raw: np.ndarray, path: str | Path) -> np.ndarray:
    """Decode an encoded image file's bytes at native depth and channel count (``cv2.IMREAD_UNCHANGED``).

    Unlike ``IMREAD_COLOR`` this does not apply EXIF orientation, like the mask reader: a pair stays aligned.
    """
    array = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if array is None:
        raise ValueError(f"cannot decode image {path} (expected a PNG/JPEG/BMP/TIFF file)")
    return array


def image_to_rgb8(array: np.ndarray, path: str | Path = "<array>", intensity: Intensity | str | None = None
                  ) -> np.ndarray:
    """Convert a decoded image (OpenCV channel order) to uint8 RGB H×W×3, explicitly for every storage form.

    2-D gray (or H×W×1) → three identical channels; 3-channel BGR → RGB; 4-channel BGRA → RGB, alpha dropped;
    16-bit and float values → uint8 by ``intensity`` (default auto; module docstring). Other depths raise ValueError.
    """
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]  # alpha out first: it must not take part in the intensity statistics
    array = intensity_to_uint8(array, intensity, path)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
    if array.ndim == 3 and array.shape[2] == 3:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    if array.ndim == 3 and array.shape[2] == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2RGB)
    raise ValueError(f"image {path}: shape {array.shape} is not supported (expected gray, BGR or BGRA)")


def read_image_rgb(path: str | Path, intensity: Intensity | str | None = None) -> np.ndarray:
    """Read an image file as uint8 RGB H×W×3 (gray → 3 channels, alpha dropped, 16-bit and float values by
    ``intensity``: default auto)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    return image_to_rgb8(decode_image(np.fromfile(path, dtype=np.uint8), path), path, intensity)


def header_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file from its header only (PIL reads no pixel data until asked)."""
    with warnings.catch_warnings():
        # Large scans trip PIL's decompression-bomb warning; nothing is decoded here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            width, height = image.size
    return height, width


def aspect_ratios_differ(image_hw: tuple[int, int], mask_hw: tuple[int, int]) -> bool:
    """True when an image and a mask cannot line up: their aspect ratios differ by more than 1 %."""
    (ih, iw), (mh, mw) = image_hw, mask_hw
    return abs(ih * mw - iw * mh) > 0.01 * ih * mw


def resize_image(rgb: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """``rgb`` (H×W or H×W×C) at ``size`` (an int for a square, or (height, width)) by the one resize rule:
    ``INTER_AREA`` when no side grows, bicubic when any side grows, ``rgb`` itself when the size matches."""
    height, width = (size, size) if isinstance(size, int) else size
    if rgb.shape[:2] == (height, width):
        return rgb
    shrinking = rgb.shape[0] >= height and rgb.shape[1] >= width
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def write_png(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 gray (H×W) or RGB (H×W×3) image as PNG, atomically (a temporary name, then a rename)."""
    bgr = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    ok, encoded = cv2.imencode(".png", bgr)
    if not ok:
        raise OSError(f"cannot encode PNG for {path}")
    return write_bytes_atomic(path, encoded.tobytes(), durable=False)

"""Image files: decoding at native depth, conversion to 8-bit RGB, header sizes, the one resize rule, PNG writes.

Images of any common storage form load as 8-bit RGB: gray is replicated to three channels, 16-bit is scaled
(value // 257, never clipped), alpha is dropped. Resizing follows one rule everywhere (training samples, pair
files, backgrounds, segmenter inputs, feature thumbnails): ``INTER_AREA`` (an average: no aliasing) when neither
side grows, bicubic when any side grows, and the array itself when the size already matches.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ldm.fileio import write_bytes_atomic

import cv2
import numpy as np
from PIL import Image

__all__ = ["IMAGE_SUFFIXES", "aspect_ratios_differ", "decode_image", "header_size", "image_to_rgb8",
           "read_image_rgb", "resize_image", "write_png"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def decode_image(raw: np.ndarray, path: str | Path) -> np.ndarray:
    """Decode an encoded image file's bytes at native depth and channel count (``cv2.IMREAD_UNCHANGED``).

    Unlike ``IMREAD_COLOR`` this does not apply EXIF orientation, like the mask reader: a pair stays aligned.
    """
    array = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if array is None:
        raise ValueError(f"cannot decode image {path} (expected a PNG/JPEG/BMP/TIFF file)")
    return array


def image_to_rgb8(array: np.ndarray, path: str | Path = "<array>") -> np.ndarray:
    """Convert a decoded image (OpenCV channel order) to uint8 RGB H×W×3, explicitly for every storage form.

    2-D gray (or H×W×1) → three identical channels; 3-channel BGR → RGB; 4-channel BGRA → RGB, alpha dropped;
    uint16 → uint8 by ``value // 257`` (65535 → 255; scaled, never clipped). Other depths raise ValueError.
    """
    if array.dtype == np.uint16:
        array = (array // 257).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"image {path}: pixel type {array.dtype} is not supported (expected 8- or 16-bit integers)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
    if array.ndim == 3 and array.shape[2] == 3:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    if array.ndim == 3 and array.shape[2] == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2RGB)
    raise ValueError(f"image {path}: shape {array.shape} is not supported (expected gray, BGR or BGRA)")


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 RGB H×W×3 (gray → 3 channels, 16-bit → value // 257, alpha dropped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    return image_to_rgb8(decode_image(np.fromfile(path, dtype=np.uint8), path), path)


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

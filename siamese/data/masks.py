"""Binary lesion masks: reading, binarisation, resizing, PNG export and the "Random" mask augmentation.

Siamese-Diffusion conditions on binary segmentation masks. The released dataset code converts every mask to
8-bit grayscale (ITU-R 601 luma, as PIL's ``convert('L')`` and OpenCV's ``BGR2GRAY`` both do) and keeps pixels
``> 127`` as foreground; this module reproduces that convention for gray, BGR and 16-bit inputs. Label masks stored
as small class values (0/1, 0/3, 0/1/2: what NIfTI exports and annotation tools write, in 8- or 16-bit files) would
all come out empty under that rule, so the automatic mode (``threshold=None``, ``data.mask_threshold: null``) reads
a mask whose values are at most 127 in at most ``LABEL_MAX_LEVELS`` levels as a label mask (foreground = any
non-zero label) and any other mask at gray level 127. A 16-bit file is scaled to 8 bit (÷ 257) only when it uses the
16-bit range (a value above 255): 16-bit masks holding 0/1, 0/k or 0/255 keep their values, so they are read by the
same rules as 8-bit ones. Two details of the original are deliberately not carried
over: saved masks are exactly 0/255 (the original wrote masks through a uint8 wrap-around and dithering path that
added spurious foreground pixels), and the "Random" mask protocol of the paper's segmentation tables (flip, scale,
shift of training masks) is an explicit, seeded, frozen configuration instead of ad-hoc code. Everything here works
on numpy arrays so sampling and data loading can share it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "MaskAugment",
    "augment_mask",
    "binarize_mask",
    "is_label_mask",
    "mask_to_gray",
    "mask_to_png",
    "read_mask",
    "read_mask_gray",
    "resize_mask",
    "resolve_threshold",
]

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 127  # the released dataset code keeps gray values > 127 as foreground
AUTO_THRESHOLD = None  # threshold=None: label masks → foreground = any label > 0, any other mask → DEFAULT_THRESHOLD
LABEL_MAX_LEVELS = 16  # a label mask has at most this many distinct values (background included), all ≤ 127


def _to_uint8(mask: np.ndarray) -> np.ndarray:
    if mask.dtype == np.uint8:
        return mask
    if mask.dtype == np.uint16:
        if int(mask.max(initial=0)) <= 255:  # 8-bit levels or class labels stored in a 16-bit file: keep them
            return mask.astype(np.uint8)
        # The 16-bit range: 65535 -> 255 exactly; integer division keeps the mapping monotone, free of rounding.
        return (mask // 257).astype(np.uint8)
    raise ValueError(f"mask dtype {mask.dtype} is not supported (expected uint8, uint16 or bool)")


def _check_threshold(threshold: int | None) -> None:
    if threshold is not None and not 0 <= int(threshold) <= 254:
        raise ValueError(f"threshold {threshold} must lie in 0..254 (an 8-bit gray level) or be None (automatic)")


def mask_to_gray(mask: np.ndarray) -> np.ndarray:
    """Reduce a mask array to uint8 8-bit gray H×W: the value every threshold refers to.

    Accepts H×W, H×W×1, H×W×3 (BGR, OpenCV order) and H×W×4 (BGRA; alpha ignored) arrays of dtype uint8 or
    uint16 (scaled to 8 bit, 65535 → 255, when a value exceeds 255; kept as they are otherwise), and bool arrays
    (True → 1). Colour is reduced to luma, exactly like the original's ``convert('L')``.
    """
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask must be a numpy array, got {type(mask).__name__}")
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.ndim == 2:
        channels = 1
    elif mask.ndim == 3 and mask.shape[2] in (3, 4):
        channels = mask.shape[2]
    else:
        raise ValueError(f"mask shape {mask.shape} is not supported (expected H×W, H×W×1, H×W×3 or H×W×4)")
    if mask.shape[0] == 0 or mask.shape[1] == 0:
        raise ValueError(f"mask shape {mask.shape} is empty")
    if mask.dtype == np.bool_:
        return (mask if channels == 1 else mask[:, :, :3].any(axis=2)).astype(np.uint8)
    mask8 = np.ascontiguousarray(_to_uint8(mask))
    if channels == 3:
        return cv2.cvtColor(mask8, cv2.COLOR_BGR2GRAY)
    if channels == 4:
        return cv2.cvtColor(mask8, cv2.COLOR_BGRA2GRAY)
    return mask8


def is_label_mask(gray: np.ndarray) -> bool:
    """True for a label mask (class values, not gray levels): some value > 0, every value ≤ ``DEFAULT_THRESHOLD``
    (so gray level 127 would read it as empty) and at most ``LABEL_MAX_LEVELS`` distinct values (0/1, 0/3, 0/1/2; an
    all-zero mask is just empty)."""
    top = int(gray.max())
    if not 0 < top <= DEFAULT_THRESHOLD:
        return False
    return top == 1 or len(np.unique(gray)) <= LABEL_MAX_LEVELS


def resolve_threshold(gray: np.ndarray, threshold: int | None) -> int:
    """The gray level a mask is binarised at: ``threshold`` itself, or for ``None`` (automatic) 0 for a label mask
    (foreground = any non-zero label, ``is_label_mask``) and ``DEFAULT_THRESHOLD`` for anything else."""
    if threshold is not None:
        return int(threshold)
    return 0 if is_label_mask(gray) else DEFAULT_THRESHOLD


def binarize_mask(mask: np.ndarray, threshold: int | None = DEFAULT_THRESHOLD) -> np.ndarray:
    """Return a single-channel uint8 {0, 1} mask: 1 where the 8-bit gray value is ``> threshold``.

    Accepts H×W, H×W×1, H×W×3 (BGR, OpenCV order) and H×W×4 (BGRA; alpha ignored) arrays of dtype uint8 or
    uint16 (``mask_to_gray``: the threshold always refers to the 0..255 range). Boolean arrays are taken as already
    binary. Colour masks are reduced to luma, exactly like the original's ``convert('L')``. ``threshold=None`` is
    the automatic rule (:func:`resolve_threshold`): label masks (0/1, 0/k, class maps) keep every label as
    foreground.
    """
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask must be a numpy array, got {type(mask).__name__}")
    _check_threshold(threshold)
    if mask.dtype == np.bool_:
        return mask_to_gray(mask)
    gray = mask_to_gray(mask)
    level = resolve_threshold(gray, threshold)
    out = (gray > level).astype(np.uint8)
    if not out.any() and gray.any():
        # The classic silent failure: label masks stored as 0/1 (or faint colours) all fall below the threshold.
        logger.warning(
            "mask has non-zero values (max gray %d) but none above threshold %d: the binarised mask is empty; "
            "if masks are stored as class labels, use threshold=None (automatic; data.mask_threshold: null) "
            "or threshold=0",
            int(gray.max()),
            level,
        )
    return out


def _check_binary(mask01: np.ndarray, what: str) -> np.ndarray:
    if not isinstance(mask01, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(mask01).__name__}")
    if mask01.ndim == 3 and mask01.shape[2] == 1:
        mask01 = mask01[:, :, 0]
    if mask01.ndim != 2:
        raise ValueError(f"{what} must be a single-channel H×W array, got shape {mask01.shape}")
    if mask01.dtype == np.bool_:
        return mask01.astype(np.uint8)
    values = np.unique(mask01)
    if not np.isin(values, (0, 1)).all():
        shown = ", ".join(str(v) for v in values[:6])
        raise ValueError(f"{what} must contain only 0 and 1, found values [{shown}{', …' if len(values) > 6 else ''}]")
    return mask01.astype(np.uint8)


def mask_to_png(mask01: np.ndarray) -> np.ndarray:
    """Map a {0, 1} (or bool) H×W mask to a uint8 array with values exactly {0, 255}, ready for ``cv2.imwrite``.

    Values other than 0/1 raise instead of wrapping around (e.g. a 0/255 mask multiplied by 255 again).
    """
    return _check_binary(mask01, "mask01") * np.uint8(255)


def resize_mask(mask01: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a {0, 1} mask to ``size`` (an int for square, or (height, width)) with nearest-neighbour sampling.

    Nearest interpolation never invents intermediate values, so the result stays strictly binary.
    """
    mask01 = _check_binary(mask01, "mask01")
    height, width = (size, size) if isinstance(size, int) else size
    if height <= 0 or width <= 0:
        raise ValueError(f"resize size must be positive, got {size}")
    if mask01.shape == (height, width):
        return mask01.copy()
    return cv2.resize(mask01, (width, height), interpolation=cv2.INTER_NEAREST)


EROSION_KERNELS = {"ellipse": cv2.MORPH_ELLIPSE, "rect": cv2.MORPH_RECT, "cross": cv2.MORPH_CROSS}


def erode_mask(mask01: np.ndarray, pixels: int, kernel: str = "ellipse") -> np.ndarray:
    """MedDiff-FT's mask "corrosion" (Xie et al. 2025): erode a {0, 1} mask by ``pixels`` with a
    (2·pixels + 1)² structuring element of shape ``kernel`` (ellipse, rect or cross), so the saved mask lies inside
    the generated lesion's often soft boundary. ``pixels = 0`` returns a copy. A mask that erosion would empty
    (a lesion thinner than 2·pixels + 1) is returned unchanged: an empty label on a lesion image is worse than a
    slightly loose one; ``mask_erodes`` tells the two apart."""
    mask01 = _check_binary(mask01, "mask01")
    if pixels < 0:
        raise ValueError(f"erosion must be >= 0 pixels, got {pixels}")
    if kernel not in EROSION_KERNELS:
        raise ValueError(f"erosion kernel {kernel!r} is not one of {sorted(EROSION_KERNELS)}")
    if pixels == 0:
        return mask01.copy()
    element = cv2.getStructuringElement(EROSION_KERNELS[kernel], (2 * pixels + 1, 2 * pixels + 1))
    eroded = cv2.erode(mask01, element, borderType=cv2.BORDER_REPLICATE)
    return eroded if eroded.any() or not mask01.any() else mask01.copy()


def mask_erodes(mask01: np.ndarray, pixels: int, kernel: str = "ellipse") -> bool:
    """Whether ``erode_mask`` changes anything other than by keeping a mask it would empty."""
    return pixels > 0 and bool(mask01.any()) and not np.array_equal(erode_mask(mask01, pixels, kernel), mask01)


def _decode_mask(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    # np.fromfile + imdecode instead of cv2.imread: works with non-ASCII paths and tells "unreadable" apart.
    raw = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if image is None:
        raise ValueError(f"cannot decode mask image {path} (expected a PNG/JPEG/BMP/TIFF file)")
    return image


def read_mask_gray(path: str | Path) -> np.ndarray:
    """Read a mask file (any bit depth / channel count OpenCV decodes) as uint8 8-bit gray H×W, not binarised."""
    path = Path(path)
    image = _decode_mask(path)
    try:
        return mask_to_gray(image)
    except ValueError as error:
        raise ValueError(f"mask {path}: {error}") from None


def read_mask(path: str | Path, threshold: int | None = AUTO_THRESHOLD) -> np.ndarray:
    """Read a mask image (any bit depth / channel count OpenCV decodes) and binarise it to uint8 {0, 1}.

    The default ``threshold=None`` is the automatic rule: a label mask (values ≤ 127 in few levels: 0/1, 0/k, a class
    map) has every non-zero label as foreground, any other mask is foreground where gray > 127 (identical to
    ``threshold=127`` for every mask that is not a label mask).
    """
    path = Path(path)
    image = _decode_mask(path)
    try:
        return binarize_mask(image, threshold)
    except ValueError as error:
        raise ValueError(f"mask {path}: {error}") from None


@dataclass(frozen=True)
class MaskAugment:
    """Parameters of the "Random" mask protocol: random flips, isotropic scale and shift (nearest interpolation).

    The transform is one affine warp about the image centre, so a mask keeps its size (H×W) and stays strictly
    binary; content pushed outside the frame is lost and empty border is background. ``shift_frac`` is the largest
    shift as a fraction of the width (x) and height (y).
    """

    flip_p: float = 0.5
    vflip_p: float = 0.5
    scale_range: tuple[float, float] = (0.8, 1.2)
    shift_frac: float = 0.1

    def __post_init__(self) -> None:
        for name in ("flip_p", "vflip_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"MaskAugment.{name}={value} must lie in [0, 1]")
        low, high = self.scale_range
        if not (0.0 < low <= high and math.isfinite(high)):
            raise ValueError(f"MaskAugment.scale_range={self.scale_range} must satisfy 0 < low <= high")
        if not 0.0 <= self.shift_frac < 1.0:
            raise ValueError(f"MaskAugment.shift_frac={self.shift_frac} must lie in [0, 1)")
        object.__setattr__(self, "scale_range", (float(low), float(high)))

    def apply(self, mask01: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Return an augmented copy of a {0, 1} H×W mask; deterministic for a given generator state."""
        mask01 = _check_binary(mask01, "mask01")
        height, width = mask01.shape
        # Always draw the same five numbers, whatever the outcome, so one generator yields reproducible streams.
        u_flip, u_vflip, u_scale, u_dx, u_dy = rng.random(5)
        flip = u_flip < self.flip_p
        vflip = u_vflip < self.vflip_p
        low, high = self.scale_range
        scale = low + (high - low) * u_scale
        dx = (2.0 * u_dx - 1.0) * self.shift_frac * width
        dy = (2.0 * u_dy - 1.0) * self.shift_frac * height

        # Pixel-centre convention: a flip maps x -> (W - 1) - x, scaling is about the centre ((W - 1) / 2, ...).
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        sx = -scale if flip else scale
        sy = -scale if vflip else scale
        matrix = np.array([[sx, 0.0, cx - sx * cx + dx], [0.0, sy, cy - sy * cy + dy]], dtype=np.float64)
        return cv2.warpAffine(
            mask01,
            matrix,
            (width, height),
            flags=cv2.INTER_NEAREST,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )


def augment_mask(
    mask01: np.ndarray,
    rng: np.random.Generator,
    *,
    flip_p: float = 0.5,
    vflip_p: float = 0.5,
    scale_range: tuple[float, float] = (0.8, 1.2),
    shift_frac: float = 0.1,
) -> np.ndarray:
    """Functional form of :class:`MaskAugment` (the paper's "Random" masks: flip, scale, shift)."""
    params = MaskAugment(flip_p=flip_p, vflip_p=vflip_p, scale_range=scale_range, shift_frac=shift_frac)
    return params.apply(mask01, rng)

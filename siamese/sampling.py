"""Sampling synthetic image-mask pairs with the Mask-Diffusion branch: the paper's data-generation protocol.

At sampling time Siamese-Diffusion needs only a mask: DDIM (50 uniform steps, η = 0) with classifier-free guidance
on the text, the unconditional input being the empty prompt with the *same* mask hint (METHOD.md, "Sampling");
faster ODE solvers (``sampler``) and separate guidance of the mask (``cfg_mask``) are options, off by default. This
module turns a set of masks into a deterministic list of work items (mask × ``n_per_mask``), each with its own seed
derived from (base seed, mask name, index k) by SHA-256. Every sample draws its initial latent and (η > 0) its
per-step noise from its own generator, so a pair is the same sample whatever batch, shard or resumed run computes
it; bit for bit, batched kernels round differently per batch size and row position, so batches are fixed chunks of
the work list (sharded whole, the last one padded) and a file depends on ``batch_size`` but not on sharding,
``limit`` or resuming. "Random" masks (flip, scale,
shift of the given masks, the authors' protocol for their segmentation tables) are drawn from a per-item generator
too, and the augmented mask is the one returned with its image. Writing pairs, the manifest and resuming live in
``siamese.data.pairs``; ``sample_pairs`` here is the notebook-friendly core.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from ldm.regions import DEFAULT_REGION, parse_region
from ldm.solvers import SAMPLERS

import numpy as np
import torch
from torch import Tensor

from cldm.model import ControlLDM
from siamese.config.schema import MASK_MODES, PRECISIONS
from siamese.data.images import IMAGE_SUFFIXES, read_image_rgb, resize_image
from siamese.data.layout import read_prompt_jsonl
from siamese.data.masks import MaskAugment, read_mask, resize_mask
from siamese.data.pairs import MaskSource, SampledPair, WorkItem

__all__ = [
    "MASK_MODES",
    "MASK_SUFFIXES",
    "PRECISIONS",
    "MaskSource",
    "SampledPair",
    "WorkItem",
    "autocast_context",
    "batches",
    "check_masks",
    "collect_backgrounds",
    "collect_masks",
    "item_background",
    "item_mask",
    "make_items",
    "mask_rng",
    "parse_shard",
    "sample_pairs",
    "sample_seed",
    "shard_items",
]

logger = logging.getLogger(__name__)

MASK_SUFFIXES = IMAGE_SUFFIXES
_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


# -- inputs ---------------------------------------------------------------------------------------------------------
def _check_unique(sources: list[MaskSource]) -> list[MaskSource]:
    seen: dict[str, Path] = {}
    for src in sources:
        if src.name in seen:
            raise ValueError(f"masks {seen[src.name]} and {src.path} share the name {src.name!r} (outputs are named "
                             f"after the file stem): rename one")
        seen[src.name] = src.path
    return sources


def collect_masks(masks: str | Path, *, default_prompt: str | None, prompt_override: str | None = None
                  ) -> list[MaskSource]:
    """The masks to sample from: a folder of mask images (one prompt for all) or a prompt JSONL.

    Folder: every ``.png/.jpg/.jpeg/.bmp/.tif/.tiff`` file directly inside it (sorted; hidden files skipped), with
    ``prompt_override`` or ``default_prompt`` (the model's ``sample.prompt``: its training data's prompt; None with
    neither is refused). JSONL (``prompt.json``): its ``source`` and ``prompt`` keys only — a
    ``target`` image is neither needed nor read; ``prompt_override`` replaces every line's prompt when given.
    """
    path = Path(masks)
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in MASK_SUFFIXES)
        if not files:
            raise ValueError(f"no mask images ({'/'.join(s[1:] for s in MASK_SUFFIXES)}) in folder {path}")
        prompt = prompt_override if prompt_override is not None else default_prompt
        if prompt is None:
            raise ValueError(f"masks in folder {path} carry no prompt and the model records none (sample.prompt is "
                             "null: it was not trained on data yet); pass --prompt \"...\"")
        return _check_unique([MaskSource(p.stem, p, prompt) for p in files])
    if path.is_file():
        records = read_prompt_jsonl(path, require_target=False)
        return _check_unique([MaskSource(r.source.stem, r.source, prompt_override if prompt_override is not None
                                         else r.prompt) for r in records])
    raise FileNotFoundError(f"--masks: no such folder or prompt file: {path}")


def sample_seed(seed: int, name: str, k: int) -> int:
    """The seed of pair ``k`` of mask ``name``: a SHA-256 of the three (stable across runs and machines)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{name}\x00{int(k)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_items(sources: Sequence[MaskSource], n_per_mask: int, seed: int, limit: int | None = None) -> list[WorkItem]:
    """All pairs, index-major (k = 0 for every mask, then k = 1, …), capped at ``limit``.

    Index-major order makes ``limit`` = number of masks give one pair per mask, and a grid of the first pairs shows
    different masks.
    """
    if n_per_mask < 1:
        raise ValueError(f"--n-per-mask must be >= 1, got {n_per_mask}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    items = [WorkItem(src, k, sample_seed(seed, src.name, k)) for k in range(n_per_mask) for src in sources]
    return items if limit is None else items[:limit]


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → (i, n) with 0 <= i < n."""
    match = _SHARD_RE.match(text)
    if not match:
        raise ValueError(f"--shard {text!r} is not of the form i/n (e.g. 0/4)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: need 0 <= i < n")
    return index, count


def shard_items(items: Sequence[WorkItem], index: int, count: int, batch_size: int = 1) -> list[WorkItem]:
    """Shard ``index`` of ``count``: every ``count``-th batch (``batch_size`` consecutive items) from batch ``index``.

    Shards are disjoint and cover the list. Sharding whole batches keeps each pair at the same batch and position as
    in an unsharded run (see ``batches``), so its file does not depend on the sharding.
    """
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    return [item for chunk in chunks[index::count] for item in chunk]


def batches(items: Sequence[WorkItem], batch_size: int) -> list[list[WorkItem]]:
    """Consecutive batches of ``batch_size`` items (the last may be shorter), as ``sample_pairs`` runs them."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def mask_rng(seed: int) -> np.random.Generator:
    """The generator of an item's random-mode augmentation (a stream separate from its torch noise)."""
    return np.random.default_rng([int(seed), 1])


def item_mask(item: WorkItem, mask_mode: str, augment: MaskAugment | None = None) -> np.ndarray:
    """The item's {0, 1} mask at the source's size: as read (``real``) or augmented with its own seed (``random``)."""
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask mode {mask_mode!r} is not one of {list(MASK_MODES)}")
    mask01 = read_mask(item.source.path)
    if mask_mode == "random":
        mask01 = (augment or MaskAugment()).apply(mask01, mask_rng(item.seed))
    return mask01


def check_masks(items: Sequence[WorkItem]) -> int:
    """Read every distinct source mask once (unreadable files fail here, before any model is built); warn about
    all-black masks. Returns the number of masks read."""
    paths = list(dict.fromkeys(item.source.path for item in items))
    for path in paths:
        if not read_mask(path).any():
            logger.warning("mask %s is all black (no foreground above gray 127): its pairs show no lesion", path)
    return len(paths)


# -- sampling -------------------------------------------------------------------------------------------------------
def autocast_context(device: torch.device | str, precision: str) -> AbstractContextManager:
    """fp32: no autocast; bf16/fp16: ``torch.autocast`` on ``device``, refused with one line where unsupported."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 is not supported on CPU: use bf16 or fp32")
    if not torch.amp.is_autocast_available(device.type):
        raise ValueError(f"precision {precision}: autocast is not available on device {device}")
    # torch.<backend>.is_bf16_supported exists for the accelerator backends (not for CPU, where bf16 autocast works).
    check = getattr(getattr(torch, device.type, None), "is_bf16_supported", None)
    if precision == "bf16" and callable(check) and not check():
        raise ValueError(f"precision bf16 is not supported on device {device}: use fp32 (or fp16)")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _to_uint8(images: Tensor) -> np.ndarray:
    # (B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8; the same mapping as cldm.callbacks.to_uint8, kept here so the
    # inference path does not import Lightning (seconds of start-up per process).
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def collect_backgrounds(folder: str | Path) -> list[Path]:
    """The background images of a folder (sorted by name), for background-preserving generation; a folder with an
    ``images/`` subfolder (``tools.repair_backgrounds``' output, a pairs folder) means its images."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"backgrounds: {root} is not a folder")
    if (root / "images").is_dir():
        root = root / "images"
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in MASK_SUFFIXES and p.is_file())
    if not paths:
        raise FileNotFoundError(f"backgrounds: no image files ({', '.join(MASK_SUFFIXES)}) in {root}")
    return paths


def item_background(item: WorkItem, backgrounds: Sequence[Path]) -> Path:
    """The background of a work item: drawn by its seed (the same pairing whatever batch, shard or resume)."""
    digest = hashlib.sha256(f"background:{item.seed}".encode()).digest()
    return backgrounds[int.from_bytes(digest[:8], "big") % len(backgrounds)]


def _backgrounds(paths: Sequence[Path], masks: Sequence[np.ndarray], hint_size: int, device: torch.device,
                 intensity: str | None = None) -> Tensor:
    """Background images → (B, 3, S, S) in [-1, 1] at the hint size, read as training reads images (``intensity``:
    the model's ``data.intensity``); a background whose aspect ratio differs from its mask's is refused (both are
    resized to the same square)."""
    out = []
    for path, mask in zip(paths, masks, strict=True):
        try:
            rgb = read_image_rgb(path, intensity)
        except ValueError as error:
            raise ValueError(f"background {path}: not a readable image ({error})") from None
        (h, w), (mh, mw) = rgb.shape[:2], mask.shape[:2]
        if abs(h / w - mh / mw) > 0.01 * (mh / mw):
            raise ValueError(f"background {path} is {h}×{w} but its mask is {mh}×{mw}: different aspect ratios")
        out.append(resize_image(rgb, hint_size))
    stacked = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return stacked.to(device)


def _hints(masks: Sequence[np.ndarray], hint_size: int, device: torch.device) -> Tensor:
    stacked = np.stack([resize_mask(m, hint_size) for m in masks]).astype(np.float32)
    return torch.from_numpy(stacked)[:, None].repeat(1, 3, 1, 1).to(device)


class _PromptCache:
    """Text contexts encoded one prompt at a time and reused: a sample's context then does not depend on which
    prompts share its batch (batched encoding changes the last float bits), and a shared prompt is encoded once."""

    def __init__(self, model: ControlLDM, limit: int = 256) -> None:
        self.model, self.limit, self.table = model, limit, {}

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        for prompt in prompts:
            if prompt not in self.table:
                if len(self.table) >= self.limit:  # many distinct prompts (one per JSONL line): bound the memory
                    self.table.clear()
                self.table[prompt] = self.model.encode_prompts([prompt])
        return torch.cat([self.table[p] for p in prompts])


def sample_pairs(model: ControlLDM, items: Sequence[WorkItem], *, hint_size: int, steps: int = 50,
                 cfg_scale: float = 9.0, eta: float = 0.0, batch_size: int = 4, mask_mode: str = "real",
                 augment: MaskAugment | None = None, precision: str = "fp32", batched_cfg: bool = True,
                 pad: bool = True, sampler: str = "ddim", cfg_mask: float | None = None,
                 backgrounds: Sequence[Path] | None = None, region: str = DEFAULT_REGION,
                 intensity: str | None = None) -> Iterator[SampledPair]:
    """Generate one image per work item with the mask branch; yields pairs in item order, batch by batch.

    ``model`` is a loaded ``ControlLDM`` on its device (``model.eval()``), or a base ``LatentDiffusion`` (then
    ``backgrounds`` is required: the mask acts only through background-preserving generation); ``hint_size`` is the
    mask resolution the model was trained with (``ExperimentConfig.hint_size``: the image size for an ×8 VAE).
    Guidance: ``cfg_scale`` with the empty prompt and the same hint as unconditional input (as
    ``ControlLDM.sample``); 1 = the conditional branch only; ``cfg_mask`` adds separate guidance of the mask
    (``ControlLDM.sample``); ``sampler`` is one of
    ``ldm.solvers.SAMPLERS``; ``backgrounds``: background-preserving generation, each item's image generated inside
    its mask on a background drawn by its seed (``item_background``) and kept outside it, ``region`` choosing the
    latent cells generated (``ldm.regions``; it acts only with backgrounds). Each pair's noise comes
    from ``torch.Generator().manual_seed(item.seed)`` (drawn on CPU in float32, then moved), text contexts are
    encoded per prompt (and cached), and rows of a batch never interact.
    Batched kernels still round differently at other batch sizes and row positions, so a file is bit-identical for
    the same ``batch_size`` and position in its batch (``pad`` keeps the last batch full-size); between batch sizes
    images agree up to float rounding. Example::

        items = make_items(collect_masks("masks/", default_prompt="A photo of a polyp."), n_per_mask=2, seed=0)
        for pair in sample_pairs(model, items, hint_size=cfg.hint_size, steps=50):
            show(pair.image, pair.mask01)
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {list(SAMPLERS)}")
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask mode {mask_mode!r} is not one of {list(MASK_MODES)}")
    region = str(parse_region(region))  # a bad spec is refused before any work
    if not isinstance(model, ControlLDM) and (not backgrounds or cfg_mask is not None):
        raise ValueError("a base model without a ControlNet samples pairs only with backgrounds (and no cfg_mask)")
    device = next(model.parameters()).device
    autocast = autocast_context(device, precision)
    contexts = _PromptCache(model)
    for batch in batches(items, batch_size):
        masks = [item_mask(item, mask_mode, augment) for item in batch]
        # A short last batch is padded with copies of its last item (results dropped): every pair is computed in a
        # batch of exactly batch_size rows, at its own position — what makes files independent of --limit/resume.
        padded = batch + [batch[-1]] * (batch_size - len(batch) if pad else 0)
        padded_masks = masks + [masks[-1]] * (len(padded) - len(batch))
        generators = [torch.Generator().manual_seed(item.seed) for item in padded]
        bg_paths = [item_background(item, backgrounds) for item in padded] if backgrounds else None
        bg = _backgrounds(bg_paths, padded_masks, hint_size, device, intensity) if bg_paths else None
        with autocast:
            prompts = [item.source.prompt for item in padded]
            unconditional = cfg_scale != 1.0 or cfg_mask is not None
            hints = _hints(padded_masks, hint_size, device)
            if isinstance(model, ControlLDM):
                images = model.sample(hints, prompts, steps=steps, cfg_scale=cfg_scale, eta=eta, generator=generators,
                                      batched_cfg=batched_cfg, context=contexts(prompts),
                                      uncond_context=contexts([""] * len(prompts)) if unconditional else None,
                                      sampler=sampler, cfg_mask=cfg_mask, background=bg, region=region)
            else:  # a base model (no ControlNet): the mask acts through the background only
                images = model.sample(prompts, hint_size, steps=steps, cfg_scale=cfg_scale, eta=eta,
                                      generator=generators, batched_cfg=batched_cfg, sampler=sampler, background=bg,
                                      mask=hints[:, :1], region=region)
        for i, (item, mask01, rgb) in enumerate(zip(batch, masks, _to_uint8(images))):
            yield SampledPair(item, rgb, resize_mask(mask01, rgb.shape[:2]), mask01, bg_paths[i] if bg_paths else None)

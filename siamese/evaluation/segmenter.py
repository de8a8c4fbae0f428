"""The downstream segmenter: what the paper's tables measure and what mask fidelity is judged with.

A binary segmentation network trained on image-mask pairs, evaluated with Dice / IoU on held-out real pairs. The
default is MONAI's ``BasicUNet`` (a plain 2D U-Net, Ronneberger et al. 2015, randomly initialised: nothing
downloads); ``smp_unet`` is segmentation-models-pytorch's U-Net with a ResNet encoder (``encoder_weights=None``).
The loss is Dice + binary cross-entropy on the logits (MONAI ``DiceLoss(sigmoid=True)`` + BCE), AdamW, horizontal
and vertical flips; images and masks are resized to a square ``resolution`` (masks with nearest neighbour) and
predictions are resized back to each ground truth's size before scoring.

This is the evaluation harness's own small supervised training (a few hundred steps of a segmenter on a few hundred
pairs, one process, no DeepSpeed), not the diffusion trainer: it runs in a plain loop so that many (arm, seed) runs
fit in minutes on a CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ldm.progress import progress as progress_of

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siamese.data.images import resize_image
from siamese.data.masks import resize_mask
from siamese.evaluation.settings import NETWORKS, SegmenterConfig  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

def build_segmenter(cfg: SegmenterConfig) -> nn.Module:
    """The network, randomly initialised (1 output channel: lesion logits)."""
    if cfg.network == "basic_unet":
        from monai.networks.nets import BasicUNet

        return BasicUNet(spatial_dims=2, in_channels=3, out_channels=1, features=cfg.features)
    import segmentation_models_pytorch as smp

    return smp.Unet(encoder_name=cfg.encoder, encoder_weights=None, in_channels=3, classes=1)


def _prepare(rgb: np.ndarray, mask01: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    image = resize_image(rgb, size).transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
    if mask01 is None:
        return image, None
    return image, resize_mask(mask01, size).astype(np.float32)[None]


def stack_pairs(pairs: Sequence[tuple[np.ndarray, np.ndarray]], size: int) -> tuple[Tensor, Tensor]:
    """(uint8 RGB, {0, 1} mask) pairs → (N, 3, S, S) images in [-1, 1] and (N, 1, S, S) masks."""
    prepared = [_prepare(rgb, mask, size) for rgb, mask in pairs]
    return (torch.from_numpy(np.stack([p[0] for p in prepared])),
            torch.from_numpy(np.stack([p[1] for p in prepared])))


def train_segmenter(pairs: Sequence[tuple[np.ndarray, np.ndarray]], cfg: SegmenterConfig, *, seed: int,
                    device: torch.device | str = "cpu", progress: bool = True, desc: str = "segmenter",
                    model: nn.Module | None = None) -> nn.Module:
    """Train a segmenter on (uint8 RGB, {0, 1} mask) pairs for ``cfg.steps`` steps; deterministic for a seed.
    ``model``: continue training that network (fine-tuning: a fresh AdamW at ``cfg.lr``) instead of a new one."""
    from monai.losses import DiceLoss

    if len(pairs) < 1:
        raise ValueError("no training pairs for the segmenter")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    if model is None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = build_segmenter(cfg)
    model = model.to(device)
    images, masks = stack_pairs(pairs, cfg.resolution)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    dice_loss = DiceLoss(sigmoid=True)
    model.train()
    for _ in progress_of(range(cfg.steps), desc=desc, unit="step", disable=not progress, leave=False, lines=5):
        index = torch.randint(0, len(images), (min(cfg.batch_size, len(images)),), generator=generator)
        x, y = images[index], masks[index]
        flips = torch.rand(2, generator=generator)
        if flips[0] < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        if flips[1] < 0.5:
            x, y = x.flip(-2), y.flip(-2)
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss = dice_loss(logits, y) + F.binary_cross_entropy_with_logits(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: Sequence[np.ndarray], cfg: SegmenterConfig, *, batch_size: int = 16,
            device: torch.device | str = "cpu") -> list[np.ndarray]:
    """Lesion probability maps (float32 in [0, 1]) at each input image's own size."""
    out = []
    model.eval()
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        x = torch.from_numpy(np.stack([_prepare(rgb, None, cfg.resolution)[0] for rgb in chunk])).to(device)
        probs = torch.sigmoid(model(x)).float().cpu().numpy()[:, 0]
        out += [cv2.resize(p, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
                for p, rgb in zip(probs, chunk)]
    return out


def save_segmenter(model: nn.Module, cfg: SegmenterConfig, path: Path, trained_on: str | None = None) -> Path:
    """Weights + the config (safetensors metadata), so validation during training can reuse the segmenter;
    ``trained_on``: the key of its inputs (training pairs' digests, settings, seed), so a cached segmenter is reused
    only for the very same inputs."""
    import json
    from dataclasses import asdict

    from ldm.checkpoint import save_state_dict

    meta = {"segmenter": json.dumps(asdict(cfg))} | ({"trained_on": trained_on} if trained_on else {})
    return save_state_dict(dict(model.state_dict()), path, metadata=meta, overwrite=True)


def segmenter_trained_on(path: Path) -> str | None:
    """The inputs key a saved segmenter carries (None: none recorded, or no file)."""
    from ldm.checkpoint import read_metadata

    return read_metadata(path).get("trained_on") if Path(path).is_file() else None


def load_segmenter(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, SegmenterConfig]:
    import json

    from ldm.checkpoint import load_state_dict, read_metadata

    meta = read_metadata(path)
    if "segmenter" not in meta:
        raise ValueError(f"{path}: not a segmenter saved by this framework (no 'segmenter' metadata)")
    raw = json.loads(meta["segmenter"])
    raw["features"] = tuple(raw["features"])
    cfg = SegmenterConfig(**raw)
    model = build_segmenter(cfg)
    model.load_state_dict(load_state_dict(path))
    return model.to(device).eval(), cfg

"""MedDiff-FT's mask generator (Xie et al., MICCAI 2025): a small pixel-space DDPM over the dataset's binary masks.

A mask ``M ∈ {0, 1}`` is trained as ``x0 = 2M − 1`` with DDPM's loss (Ho et al. 2020) on a 1-channel
``ldm.unet.UNetModel`` without attention in its levels, the network predicting ``maskgen.prediction``: v =
√ᾱ_t ε − √(1−ᾱ_t) x0 (Salimans & Ho 2022; the default) or ε (``‖ε_θ(x_t, t) − ε‖²``). Binary masks are where
ε-prediction fails in practice: near t = T its x̂0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t amplifies the ε error by up to
1/√ᾱ_T ≈ 160, the sampler locks the initial noise in as speckle, and the tiny preset's ε model (3000 steps, EMA)
sampled 95 % multi-speckle masks; v keeps x̂0 bounded at every t. New masks come from
the DDIM / ODE solvers of ``ldm.solvers`` and are thresholded at ``maskgen.threshold`` of ``(x + 1) / 2``, so every
output is binary by construction (an empty one is counted, not hidden). ``mask_statistics`` measures what the
generator learnt: per mask its area fraction, connected components and IoU to the nearest training mask (novelty =
1 − that IoU: a near-copy scores ≈ 0), and a summary against the training masks' own distribution.

``MaskDDPMModule`` is a ``cldm.lightning.TrainModule``: it trains through ``tools.train.train`` (same trainer,
strategy, checkpoints, resume and image logger as every other stage), in ``<train.output_dir>/maskgen``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ldm.sampler import clipped_denoiser
from ldm.schedule import Schedule
from ldm.solvers import sample
from ldm.unet import UNetConfig, UNetModel

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from cldm.lightning import StepLoss, TrainModule
from siamese.config import ExperimentConfig
from siamese.config.maskgen import PREDICTIONS, MaskGenConfig
from siamese.data.masks import read_mask, resize_mask
from siamese.data.provenance import Record, dataset_record
from siamese.data.synthetic import synthetic_pair
from siamese.evaluation.metrics import iou_matrix
from siamese.sampling import collect_masks

STAGE = "maskgen"  # the run folder under train.output_dir


def run_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``train`` with the mask generator's steps, lr and batch size, in ``<train.output_dir>/maskgen``."""
    m = cfg.maskgen
    train = replace(cfg.train, total_steps=m.total_steps, lr=m.lr, batch_size=m.batch_size,
                    output_dir=str(Path(cfg.train.output_dir) / STAGE))
    return replace(cfg, train=train)


def unet_config(cfg: MaskGenConfig) -> UNetConfig:
    u = cfg.unet
    return UNetConfig(image_size=cfg.resolution, in_channels=1, out_channels=1, model_channels=u.model_channels,
                      attention_resolutions=(), num_res_blocks=u.num_res_blocks, channel_mult=tuple(u.channel_mult),
                      num_heads=u.num_heads, context_dim=u.context_dim, use_checkpoint=u.use_checkpoint,
                      dropout=u.dropout)


def build_denoiser(cfg: MaskGenConfig) -> UNetModel:
    return UNetModel(unet_config(cfg))


def build_schedule(cfg: MaskGenConfig) -> Schedule:
    return Schedule.from_config(cfg.beta_schedule, cfg.timesteps, cfg.linear_start, cfg.linear_end)


def null_context(unet: UNetModel, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """One all-zero token: the middle block's cross-attention (which UNetModel always has) becomes a constant."""
    return torch.zeros(batch, 1, unet.config.context_dim, device=device, dtype=dtype)


def network(unet: UNetModel, x: Tensor, t: Tensor) -> Tensor:
    """The raw output at (x_t, t), unconditional; the encoder runs under autograd (the whole network is trained)."""
    context = null_context(unet, x.shape[0], x.device, x.dtype)
    return unet(x, t, context, encoder_grad=torch.is_grad_enabled())


def _coefficients(alphas_cumprod: Tensor, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(√ᾱ_t, √(1 − ᾱ_t)) broadcast to ``like``."""
    ac = alphas_cumprod.to(like.device)[t].float().view(-1, *([1] * (like.dim() - 1)))
    return ac.sqrt(), (1 - ac).sqrt()


def training_target(prediction: str, x0: Tensor, noise: Tensor, alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """What the network regresses: ε, or v = √ᾱ_t ε − √(1−ᾱ_t) x0 (Salimans & Ho 2022, "v-prediction")."""
    if prediction == "eps":
        return noise
    a, s = _coefficients(alphas_cumprod, t, x0)
    return a * noise - s * x0


def eps(unet: UNetModel, x: Tensor, t: Tensor, prediction: str = "eps",
        alphas_cumprod: Tensor | None = None) -> Tensor:
    """ε̂(x_t, t) for the solvers, whatever the network predicts: from v, ε̂ = √ᾱ_t v̂ + √(1−ᾱ_t) x_t."""
    out = network(unet, x, t)
    if prediction == "eps":
        return out
    if alphas_cumprod is None:
        raise ValueError("v-prediction needs the schedule's alphas_cumprod")
    a, s = _coefficients(alphas_cumprod, t, x)
    return (a * out.float() + s * x.float()).to(out.dtype)


# -- data -----------------------------------------------------------------------------------------------------------
def folder_masks(folder: str | Path, resolution: int, threshold: int | None = None) -> list[np.ndarray]:
    """Every mask of a folder (or prompt.json's ``source`` files), binarised and resized to ``resolution``²."""
    return [resize_mask(read_mask(src.path, threshold), resolution)
            for src in collect_masks(folder, default_prompt="")]


def training_masks(cfg: ExperimentConfig) -> list[np.ndarray]:
    """The masks the generator learns, {0, 1} at ``maskgen.resolution``: ``data.root``'s (its prompt.json sources,
    or a folder of masks), or the generated lesion pairs' masks (``data.root: null``, the seed of build_dataset)."""
    size = cfg.maskgen.resolution
    if cfg.data.root is None:
        return [resize_mask(synthetic_pair(i, cfg.data.resolution, seed=cfg.train.seed)[1], size)
                for i in range(cfg.data.synthetic_samples)]
    return folder_masks(_masks_root(cfg.data.root), size, cfg.data.mask_threshold)


def _masks_root(root: str | Path) -> Path:
    """``data.root`` as ``collect_masks`` takes it: its prompt.json when it has one, else the folder of masks."""
    root = Path(root)
    return root / "prompt.json" if root.is_dir() and (root / "prompt.json").is_file() else root


def training_masks_record(cfg: ExperimentConfig, what: str) -> Record:
    """What the generator learns (the masks of ``training_masks``) as a ``trained`` provenance record: every mask
    file by digest, or a note for the generated lesions (no file of the user's)."""
    if cfg.data.root is None:
        return Record("trained", what, note=f"procedural lesion masks: {cfg.data.synthetic_samples} "
                                            f"(seed {cfg.train.seed})")
    root = _masks_root(cfg.data.root)
    sources = collect_masks(root, default_prompt="")
    return dataset_record(what, root.parent if root.is_file() else root, masks=[src.path for src in sources])


class MaskDataset(Dataset):
    """Items ``{"mask": 1×R×R float in [-1, 1]}`` from {0, 1} masks held in memory (R² bytes each)."""

    def __init__(self, masks: Sequence[np.ndarray]):
        if not masks:
            raise ValueError("no training masks")
        self.masks = np.stack(masks).astype(np.uint8)

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"mask": torch.from_numpy(self.masks[index]).float()[None] * 2 - 1}


# -- training -------------------------------------------------------------------------------------------------------
class MaskDDPMModule(TrainModule):
    """Trains ``unet`` (every parameter) with ``‖f_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t) − target‖²``, t uniform in [0, T),
    the target ε or v (``training_target``)."""

    def __init__(self, unet: UNetModel, schedule: Schedule, *, lr: float, threshold: float = 0.5,
                 prediction: str = "eps"):
        super().__init__(lr)
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction {prediction!r} is not one of {list(PREDICTIONS)}")
        self.unet = unet.requires_grad_(True).train()
        self.threshold = threshold
        self.prediction = prediction
        self._schedule = schedule  # plain tensors, not module state: rebuilt from the config, never checkpointed

    def schedule(self, device: torch.device) -> Schedule:
        if self._schedule.device != device:
            self._schedule = self._schedule.to(device)
        return self._schedule

    def step_loss(self, batch: dict, step: int) -> StepLoss:
        x0 = batch["mask"].float()
        schedule = self.schedule(x0.device)
        t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = schedule.q_sample(x0, t, noise).to(self.unet.dtype)
        target = training_target(self.prediction, x0, noise, schedule.alphas_cumprod, t)
        per_sample = (network(self.unet, x_t, t).float() - target).pow(2).flatten(1).mean(1)
        return StepLoss(per_sample.mean(), {"loss_simple": per_sample}, {})

    @torch.no_grad()
    def image_columns(self, samples: dict, *, steps: int, cfg_scale: float, generator: torch.Generator,
                      sampler: str = "ddim") -> list[Tensor]:
        """training masks | generated masks (as many, binarised), gray as RGB in [-1, 1]."""
        masks = samples["mask"]
        was_training = self.unet.training
        self.unet.eval()
        generated = sample_masks(self.unet, self.schedule(masks.device), masks.shape[0], masks.shape[-1],
                                 steps=steps, generator=generator, sampler=sampler, threshold=self.threshold,
                                 prediction=self.prediction)
        self.unet.train(was_training)
        fake = torch.from_numpy(generated).to(masks.device).float()[:, None] * 2 - 1
        return [masks.repeat(1, 3, 1, 1), fake.repeat(1, 3, 1, 1)]


# -- sampling -------------------------------------------------------------------------------------------------------
def mask_seed(seed: int, index: int) -> int:
    """The seed of generated mask ``index``: a SHA-256 of (seed, index), independent of batching and sharding."""
    digest = hashlib.sha256(f"{int(seed)}\x00maskgen\x00{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def sample_masks(unet: UNetModel, schedule: Schedule, n: int, resolution: int, *, steps: int = 50,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None, sampler: str = "ddim",
                 threshold: float = 0.5, prediction: str = "eps", eta: float = 0.0) -> np.ndarray:
    """``n`` masks (n×R×R uint8 {0, 1}): the solver's x0 thresholded at ``threshold`` of ``(x + 1) / 2``. A list
    of generators (one per mask) makes each mask independent of the batch it is drawn in; with ``eta`` > 0 (DDIM
    only, ``ldm.schedule.ddim_step``: σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev) of Song et al. 2021; η = 1 is
    DDPM's ancestral step) each mask's per-step noise comes from its generator too."""
    device = next(unet.parameters()).device
    schedule = schedule.to(device)

    def denoise(x: Tensor, t: Tensor, cond: object) -> Tensor:
        return eps(unet, x, t, prediction, schedule.alphas_cumprod)

    # Masks live in {−1, 1}: x̂0 clipped to that range at every step, as pixel-space DDPM samples.
    x = sample(sampler, clipped_denoiser(denoise, schedule.alphas_cumprod), (n, 1, resolution, resolution), None,
               schedule, steps=steps, eta=eta, generator=generator, device=device, dtype=unet.dtype)
    return ((x.float()[:, 0] + 1) / 2 > threshold).to(torch.uint8).cpu().numpy()


# -- statistics -----------------------------------------------------------------------------------------------------
def components(mask01: np.ndarray) -> int:
    """8-connected foreground components."""
    return int(cv2.connectedComponents(mask01.astype(np.uint8), connectivity=8)[0]) - 1


def nearest_iou(generated: np.ndarray, training: np.ndarray, chunk: int = 256) -> np.ndarray:
    """For each generated mask, the highest IoU with any training mask (``iou_matrix``: two empty masks, IoU 1),
    ``chunk`` generated masks at a time to bound the memory of the N×M matrix."""
    return np.concatenate([iou_matrix(generated[i:i + chunk], training).max(1)
                           for i in range(0, len(generated), chunk)]).astype(np.float64)


def _summary(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    q = np.quantile(values, [0.05, 0.5, 0.95])
    return {"mean": float(values.mean()), "std": float(values.std()), "p05": float(q[0]), "median": float(q[1]),
            "p95": float(q[2])}


def _histogram(counts: np.ndarray) -> dict[str, float]:
    """Share of masks with 0, 1, 2, 3 and ≥ 4 components."""
    bins = np.minimum(counts, 4)
    return {("4+" if k == 4 else str(k)): float((bins == k).mean()) for k in range(5)}


def mask_statistics(generated: np.ndarray, training: np.ndarray) -> tuple[list[dict], dict]:
    """(per generated mask: area, components, nearest_train_iou, novelty; summary vs the training masks)."""
    if generated.shape[1:] != training.shape[1:]:
        raise ValueError(f"generated masks are {generated.shape[1:]}, training masks {training.shape[1:]}")
    for what, masks in (("generated", generated), ("training", training)):
        values = np.unique(masks)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"{what} masks are not binary: values {values[:6].tolist()} (expected 0 and 1)")
    area_gen = generated.reshape(len(generated), -1).mean(1)
    area_train = training.reshape(len(training), -1).mean(1)
    comp_gen = np.array([components(m) for m in generated])
    comp_train = np.array([components(m) for m in training])
    iou = nearest_iou(generated, training)
    per_mask = [{"area": float(a), "components": int(c), "nearest_train_iou": round(float(i), 6),
                 "novelty": round(1.0 - float(i), 6)} for a, c, i in zip(area_gen, comp_gen, iou)]
    summary = {
        "generated": len(generated), "training": len(training), "resolution": int(generated.shape[-1]),
        "empty_generated": int((area_gen == 0).sum()), "empty_training": int((area_train == 0).sum()),
        "area": {"generated": _summary(area_gen), "training": _summary(area_train)},
        "components": {"generated": {**_summary(comp_gen.astype(float)), "histogram": _histogram(comp_gen)},
                       "training": {**_summary(comp_train.astype(float)), "histogram": _histogram(comp_train)}},
        "nearest_train_iou": _summary(iou),
        "near_copies": int((iou > 0.9).sum()),  # IoU > 0.9 with some training mask: memorised rather than new
    }
    return per_mask, summary

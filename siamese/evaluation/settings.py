"""The evaluation's settings, with no torch import: the segmenter (``SegmenterConfig``) and the downstream benchmark
(``BenchmarkConfig``, its schedules ``ARMS``), and the FID tower's weight file name.

They live here so that the evaluation tools parse and check their options (and print ``--help``) before torch is
imported; ``siamese.evaluation.segmenter``, ``.benchmark`` and ``.towers`` re-export them. Imports only the
standard library.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

ARMS = ("real", "real+synthetic", "synthetic", "pretrain-finetune")
"""The benchmark's training schedules (``siamese.evaluation.benchmark``)."""

# torch-fidelity's FID Inception-v3 ("pt_inception-2015-12-05"); the same file torchmetrics' FID loads.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"

NETWORKS = ("basic_unet", "smp_unet")


@dataclass(frozen=True)
class SegmenterConfig:
    network: str = "basic_unet"  # basic_unet (MONAI) | smp_unet (segmentation-models-pytorch, resnet encoder)
    features: tuple[int, ...] = (16, 32, 64, 128, 256, 16)  # BasicUNet widths
    encoder: str = "resnet18"  # smp_unet encoder (random init)
    resolution: int = 128
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.network not in NETWORKS:
            raise ValueError(f"segmenter network {self.network!r} is not one of {list(NETWORKS)}")
        if self.resolution % 16 or self.resolution <= 0:
            raise ValueError(f"segmenter resolution must be a positive multiple of 16, got {self.resolution}")
        if self.steps <= 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ValueError("segmenter steps, batch_size and lr must be > 0")


@dataclass(frozen=True)
class BenchmarkConfig:
    seeds: int = 3
    ratios: tuple[float, ...] = (1.0,)
    arms: tuple[str, ...] = ("real", "real+synthetic", "synthetic")
    test_fraction: float = 0.2
    split_seed: int = 0
    group_regex: str | None = None
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    pretrain_share: float = 0.5  # pretrain-finetune: share of segmenter.steps on the synthetic pairs
    intensity: str = "auto"  # how 16-bit / float real images become 8 bit: the data.intensity the generators used

    def __post_init__(self) -> None:
        unknown = set(self.arms) - set(ARMS)
        if unknown:
            raise ValueError(f"unknown arm(s) {sorted(unknown)}; expected {', '.join(ARMS)}")
        if not 0.0 < self.pretrain_share < 1.0:
            raise ValueError(f"--pretrain-share must be in (0, 1), got {self.pretrain_share}")
        if self.seeds < 1 or not self.ratios or min(self.ratios) <= 0:
            raise ValueError("need --seeds >= 1 and positive --synthetic-ratio values")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        from siamese.data.images import parse_intensity  # numpy/cv2: only when a benchmark is configured

        parse_intensity(self.intensity)  # one-line ValueError naming a bad mode

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def phases(self) -> tuple[int, int]:
        """pretrain-finetune's (synthetic steps, real steps): together ``segmenter.steps``, the budget of every arm."""
        pre = min(self.segmenter.steps - 1, max(1, round(self.pretrain_share * self.segmenter.steps)))
        return pre, self.segmenter.steps - pre

"""The golden parity fixture's recipe: seeded weights and inputs, and gradient fingerprints.

Shared by ``make_golden.py`` (which runs the *released* Siamese-Diffusion code on them and writes
``golden_tiny.json``) and ``tests/test_golden_parity.py`` (which runs ours and compares). Nothing here imports the
project or the released code: both sides get the same numbers from names and shapes alone.

Every value comes from NumPy's legacy ``RandomState``, whose streams are frozen (NEP 19), seeded by the CRC-32 of a
name: the fixture needs no weight file, and the same weights come out on any machine and NumPy version.

- Weights (every tensor of the model's state dict under the original names, ``control_model.*`` /
  ``model.diffusion_model.*``): 1-D ``*.weight`` (GroupNorm / LayerNorm scales) ``1 + 0.02 n``, other 1-D tensors
  (biases) ``0.05 n``, N-D tensors ``n / sqrt(fan_in)``. Zero convolutions are *not* zero here, so every trainable
  tensor receives a gradient that depends on the whole graph.
- Gradient fingerprint of a tensor g: its norm and ``K`` projections ``r_k . g`` on standard-normal vectors r_k
  seeded by the tensor's name. An error e changes a projection by ``r_k . e``, about ``|e|`` in size, so with the
  norm a wrong gradient is caught as surely as by comparing it element-wise, at ``K + 1`` numbers a tensor instead
  of the tensor itself.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

K_PROJECTIONS = 4

# The tiny geometry of the fixture: the released cldm_v15 UNet/ControlNet with these parameters (DHI hint encoder).
GEOMETRY = {"in_channels": 4, "model_channels": 32, "attention_resolutions": [2], "num_res_blocks": 1,
            "channel_mult": [1, 2], "num_heads": 2, "use_spatial_transformer": True, "transformer_depth": 1,
            "context_dim": 32, "legacy": False, "hint_channels": 3, "hint_encoder": "dhi", "use_checkpoint": False,
            "only_mid_control": False, "control_scales": 1.0}
SCHEDULE = {"beta_schedule": "scaled_linear", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000,
            "parameterization": "eps"}
TOTAL_STEPS = 3000
# late: step 2500 of 3000 (image-control ramp 5/6, L_aug gate open for t <= 200); early: step 600 (L_aug inactive).
CASES = {"late": {"step": 2500, "t": [50, 150, 600, 900], "seed": 11},
         "early": {"step": 600, "t": [120, 400, 999], "seed": 12}}
LATENT, HINT, TOKENS = 8, 64, 8


def _rng(name: str, salt: int = 0) -> np.random.RandomState:
    return np.random.RandomState((zlib.crc32(name.encode("utf-8")) + salt) % 2**32)


def weight(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The fixture's value of parameter ``name`` (float32)."""
    n = _rng(name).standard_normal(shape)
    if len(shape) == 1:
        value = 1.0 + 0.02 * n if name.endswith(".weight") else 0.05 * n
    else:
        value = n / math.sqrt(math.prod(shape[1:]))
    return value.astype(np.float32)


def inputs(case: str) -> dict[str, np.ndarray]:
    """``z0``, ``context``, ``noise`` (standard normal), ``mask_hint`` (a blocky binary mask on 3 channels),
    ``image_hint`` (uniform in [0, 1]) and ``t`` for one case."""
    spec = CASES[case]
    b = len(spec["t"])
    rs = np.random.RandomState(spec["seed"])
    z0 = rs.standard_normal((b, 4, LATENT, LATENT)).astype(np.float32)
    context = rs.standard_normal((b, TOKENS, GEOMETRY["context_dim"])).astype(np.float32)
    noise = rs.standard_normal((b, 4, LATENT, LATENT)).astype(np.float32)
    blocks = (rs.random_sample((b, 1, 8, 8)) > 0.5).astype(np.float32)
    mask = np.repeat(np.repeat(blocks, HINT // 8, axis=2), HINT // 8, axis=3).repeat(3, axis=1)
    image = rs.random_sample((b, 3, HINT, HINT)).astype(np.float32)
    return {"z0": z0, "context": context, "noise": noise, "mask_hint": np.ascontiguousarray(mask),
            "image_hint": image, "t": np.asarray(spec["t"], dtype=np.int64)}


def fingerprint(name: str, grad: np.ndarray) -> list[float]:
    """``[norm, r_1 . g, ..., r_K . g]`` of one gradient, in float64."""
    g = np.asarray(grad, dtype=np.float64).ravel()
    r = _rng(name, salt=1).standard_normal((K_PROJECTIONS, g.size))
    return [float(np.linalg.norm(g)), *(float(v) for v in r @ g)]


def fingerprint_mismatches(got: dict[str, list[float]], ref: dict[str, list[float]], rel: float = 1e-4,
                           abs_of_max_norm: float = 1e-6) -> list[str]:
    """Names whose fingerprint differs from the reference by more than ``rel`` of the tensor's reference norm plus
    ``abs_of_max_norm`` of the largest reference norm (gradients that are mathematically zero, such as a bias right
    before a per-channel GroupNorm, are float noise and meet only the absolute part)."""
    floor = abs_of_max_norm * max(v[0] for v in ref.values())
    bad = [name for name in sorted(set(got) ^ set(ref))]
    for name in sorted(set(got) & set(ref)):
        tol = rel * ref[name][0] + floor
        if any(abs(a - b) > tol for a, b in zip(got[name], ref[name])):
            bad.append(name)
    return bad

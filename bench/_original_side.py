"""Child process of ``bench/vs_original.py``: one Siamese training step in the *released* implementation's own code.

Runs in a process of its own because the released repository's packages are also called ``ldm`` and ``cldm``;
nothing of this project is imported here (only its torchvision shim, loaded by file path). The networks are the
released ``cldm.cldm.ControlNet`` (with the DHI ``FeatureExtractor``) and ``ControlledUnetModel`` built from its
``models/cldm_v15.yaml``; the loss is its ``ControlLDM.p_losses`` / ``apply_model`` themselves (deep copies of
the ControlNet and the UNet on every step, ldm's reentrant checkpoint, einsum attention), bound to a small host
object that carries the attributes they read (schedule buffers, ``global_step``, ``trainer.max_steps``, …) in place
of the full ``LatentDiffusion`` (whose first/text stages the step does not use). The optimizer is the released
``configure_optimizers`` set: ControlNet + UNet ``output_blocks`` + ``out`` (``sd_locked=False``), AdamW.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import types
from pathlib import Path

import torch
from torch import nn


def _load_shim(project_root: Path) -> None:
    spec = importlib.util.spec_from_file_location("_project_torchvision_shim", project_root / "ldm" / "_compat.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # keeps its torch.library registration alive
    spec.loader.exec_module(module)  # applies the shim on import


def _stub(name: str, **attrs: object) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def import_released(original: Path, project_root: Path) -> tuple[type, type, type, object]:
    """The released ControlNet, ControlledUnetModel, ControlLDM and the v1.5 config."""
    _load_shim(project_root)
    sys.path.insert(0, str(original))
    # cldm.cldm imports LatentDiffusion (Lightning 1.x APIs) and DDIMSampler only to subclass / sample with them;
    # the step calls neither, so plain stand-ins keep the import working under Lightning 2.
    _stub("ldm.models.diffusion.ddpm", LatentDiffusion=nn.Module)
    _stub("ldm.models.diffusion.ddim", DDIMSampler=object)
    from omegaconf import OmegaConf

    from cldm.cldm import ControlLDM, ControlledUnetModel, ControlNet

    cfg = OmegaConf.load(original / "models" / "cldm_v15.yaml").model.params
    return ControlNet, ControlledUnetModel, ControlLDM, cfg


class Host:
    """What ``ControlLDM.p_losses`` / ``apply_model`` read from ``self`` (ldm's DDPM attributes, eps, l2)."""

    parameterization = "eps"
    learn_logvar = False
    l_simple_weight = 1.0
    original_elbo_weight = 0.0
    training = True

    def __init__(self, released: type, unet: nn.Module, control: nn.Module, cfg: object, step: int, total: int):
        self.model = types.SimpleNamespace(diffusion_model=unet)
        self.control_model = control
        self.only_mid_control = bool(cfg.only_mid_control)
        self.control_scales = [1.0] * 13
        self.global_step = step
        self.trainer = types.SimpleNamespace(max_steps=total)
        betas = torch.linspace(cfg.linear_start ** 0.5, cfg.linear_end ** 0.5, cfg.timesteps, dtype=torch.float64) ** 2
        ac = torch.cumprod(1.0 - betas, dim=0)
        self.sqrt_ac, self.sqrt_1mac = ac.sqrt().float(), (1.0 - ac).sqrt().float()
        self.sqrt_recip_ac, self.sqrt_recipm1_ac = (1.0 / ac).sqrt().float(), (1.0 / ac - 1.0).sqrt().float()
        self.logvar = torch.zeros(cfg.timesteps)
        self.lvlb_weights = torch.zeros(cfg.timesteps)
        self.device = torch.device("cpu")
        self.apply_model = types.MethodType(released.apply_model, self)
        self.p_losses = types.MethodType(released.p_losses, self)

    @staticmethod
    def _at(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return a.gather(0, t).reshape(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_ac, t, x_start) * x_start + self._at(self.sqrt_1mac, t, x_start) * noise

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_recip_ac, t, x_t) * x_t - self._at(self.sqrt_recipm1_ac, t, x_t) * noise

    @staticmethod
    def get_loss(pred: torch.Tensor, target: torch.Tensor, mean: bool = True) -> torch.Tensor:
        return torch.nn.functional.mse_loss(target, pred, reduction="mean" if mean else "none")


def build(original: Path, project_root: Path, step: int, total: int) -> tuple[Host, list[nn.Parameter]]:
    ControlNet, ControlledUnetModel, ControlLDM, cfg = import_released(original, project_root)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        unet = ControlledUnetModel(**cfg.unet_config.params)
        control = ControlNet(**cfg.control_stage_config.params)
    host = Host(ControlLDM, unet, control, cfg, step, total)
    params = [*control.parameters(), *unet.output_blocks.parameters(), *unet.out.parameters()]
    return host, params


def loss_fn(host: Host, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The released loss on this project's input names (``mask_hint``/``image_hint`` channels-first in [0, 1])."""
    cond = {"c_crossattn": [inputs["context"]], "c_concat_mask": [inputs["mask_hint"]],
            "c_concat_image": [inputs["image_hint"]]}
    with contextlib.redirect_stdout(io.StringIO()):  # p_losses prints every term
        loss, _ = host.p_losses(inputs["z0"], cond, inputs["t"], noise=inputs["noise"])
    return loss


if __name__ == "__main__":
    sys.exit("run bench/vs_original.py, which starts this module in a child process")

"""Memory layout: every 4-D activation reaching a convolution or GroupNorm is contiguous (channels-first).

torch's CPU GroupNorm backward (``GroupNormBackwardKernelImplChannelsLastInternal``, torch 2.13) segfaults on some
channels-last-strided inputs. Three views in the networks produced such strides and every later conv propagated
them: the SpatialTransformer's ``b (h w) c -> b c h w`` rearrange, the VAE attention's reshape and DHI's patch
merge. Each is made contiguous where it is created; these tests keep it so, and run the backward passes that
crashed (a plain UNet decoder, as base pretraining trains it; the VAE, as first-stage training does; ControlNet with
each hint encoder) in a child process, so a segfault fails the test instead of killing pytest.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from siamese.config import load_config
from siamese.factory import build_model


def _noncontiguous_inputs(model: torch.nn.Module) -> tuple[dict[str, tuple[int, ...]], list]:
    """GroupNorm inputs must be channels-first contiguous; conv inputs contiguous in one of the two layouts (the DHI
    trunk runs channels-last on purpose), never an accidental view."""
    found: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.Conv2d)):
            def hook(module, inputs, name=name):
                x = inputs[0]
                ok = x.is_contiguous() or (isinstance(module, torch.nn.Conv2d)
                                           and x.is_contiguous(memory_format=torch.channels_last))
                if x.dim() == 4 and not ok:
                    found[name] = x.stride()
            handles.append(module.register_forward_pre_hook(hook))
    return found, handles


@pytest.mark.parametrize("hint_encoder", ["dhi", "hi"])
def test_every_conv_and_groupnorm_input_is_contiguous(repo_root, hint_encoder):
    cfg = load_config(repo_root / "configs" / "siamese_tiny.yaml", [f"model.control.hint_encoder={hint_encoder}",
                                                                      "model.first_stage.ddconfig.attn_resolutions=[8]"])
    model = build_model(cfg.model)
    found, handles = _noncontiguous_inputs(model)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    z = model.first_stage_model.encode(images).sample()
    model.first_stage_model.decode(z)
    context = torch.randn(2, 77, cfg.model.unet.context_dim)
    model.eps(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), context, torch.rand(2, 3, 64, 64))
    for h in handles:
        h.remove()
    assert not found, f"non-contiguous conv/GroupNorm inputs: {found}"


_CRASH_CASES = textwrap.dedent("""
    import ldm, torch
    from ldm.unet import UNetConfig, UNetModel
    from siamese.config import load_config
    from siamese.factory import build_model
    torch.manual_seed(0)
    # 1. The reported case: a plain UNet whose decoder is trained (base pretraining trains all of it).
    u = UNetModel(UNetConfig(model_channels=64, context_dim=64, num_heads=8)); u.requires_grad_(False)
    for p in u.decoder_parameters().values():
        p.requires_grad_(True)
    u(torch.randn(1, 4, 32, 32), torch.tensor([100]), torch.randn(1, 77, 64), None).pow(2).mean().backward()
    u.requires_grad_(True)
    u(torch.randn(2, 4, 16, 16), torch.tensor([1, 900]), torch.randn(2, 77, 64), None).pow(2).mean().backward()
    # 2. The VAE trained end to end (first-stage pretraining), with attention in the middle blocks.
    cfg = load_config("configs/siamese_tiny.yaml", ["model.first_stage.ddconfig.attn_resolutions=[8]"])
    m = build_model(cfg.model)
    vae = m.first_stage_model.requires_grad_(True).train()
    rec, post = vae(torch.rand(2, 3, 64, 64) * 2 - 1)
    (rec.pow(2).mean() + post.kl().mean()).backward()
    # 3. ControlNet with both hint encoders.
    for name in ("dhi", "hi"):
        cfg = load_config("configs/siamese_tiny.yaml", [f"model.control.hint_encoder={name}"])
        m = build_model(cfg.model); m.configure_trainable(sd_locked=False)
        m.eps(torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.randn(2, 77, 32),
              torch.rand(2, 3, 64, 64)).pow(2).mean().backward()
    print("backward ok")
""")


def test_backward_passes_do_not_crash_in_a_child_process(repo_root):
    proc = subprocess.run([sys.executable, "-c", _CRASH_CASES], cwd=repo_root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (f"child exited with {proc.returncode} (negative = killed by signal, -11 = "
                                  f"segfault):\n{proc.stderr[-2000:]}")
    assert "backward ok" in proc.stdout

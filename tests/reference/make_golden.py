"""Regenerate ``golden_tiny.json`` by running the *released* Siamese-Diffusion code (its deep-copy ``p_losses``).

The released ``ControlNet`` (with the DHI ``FeatureExtractor``) and ``ControlledUnetModel`` are built at the tiny
geometry of ``golden.py``, loaded with its seeded weights, fed its seeded inputs, and the loss is
``ControlLDM.p_losses`` / ``apply_model`` themselves (bound to ``bench/_original_side.py``'s host object), on CPU in
fp32, then ``loss.backward()`` over the ``sd_locked=False`` trainable set (ControlNet + UNet ``output_blocks`` and
``out``). The file records the loss, the per-term means the released code prints, the names that received a gradient
and each gradient's fingerprint.

    git clone https://github.com/Qiukunpeng/Siamese-Diffusion /path/to/released
    python tests/reference/make_golden.py --original /path/to/released            # rewrites golden_tiny.json
    python tests/reference/make_golden.py --original R --check                     # compares instead of writing

``--weights W.safetensors --inputs I.safetensors --grads G.safetensors`` run one case on weights and inputs from
files instead (original key names) and compare the gradients with a full gradient file: how the recipe's output was
checked against the earlier full-tensor fixture.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = HERE / "golden_tiny.json"


def _released(original: Path):
    sys.path.insert(0, str(ROOT / "bench"))
    import _original_side as side

    control_cls, unet_cls, ldm_cls, _ = side.import_released(original, ROOT)
    return side, control_cls, unet_cls, ldm_cls


def _networks(control_cls, unet_cls):
    import golden

    geo = golden.GEOMETRY
    common = dict(image_size=32, in_channels=geo["in_channels"], model_channels=geo["model_channels"],
                  attention_resolutions=geo["attention_resolutions"], num_res_blocks=geo["num_res_blocks"],
                  channel_mult=geo["channel_mult"], num_heads=geo["num_heads"],
                  use_spatial_transformer=geo["use_spatial_transformer"], transformer_depth=geo["transformer_depth"],
                  context_dim=geo["context_dim"], use_checkpoint=geo["use_checkpoint"], legacy=geo["legacy"])
    with contextlib.redirect_stdout(io.StringIO()):
        unet = unet_cls(out_channels=geo["in_channels"], **common)
        control = control_cls(hint_channels=geo["hint_channels"], **common)
    return unet, control


def run_case(side, ldm_cls, unet, control, x: dict, step: int) -> tuple[dict, dict]:
    """The released loss and gradients on one case: (summary, {name: gradient})."""

    import golden

    for p in unet.parameters():
        p.grad = None
    for p in control.parameters():
        p.grad = None
    sch = golden.SCHEDULE
    cfg = types.SimpleNamespace(linear_start=sch["linear_start"], linear_end=sch["linear_end"],
                                timesteps=sch["timesteps"], only_mid_control=golden.GEOMETRY["only_mid_control"])
    host = side.Host(ldm_cls, unet, control, cfg, step, golden.TOTAL_STEPS)
    trainable = {f"control_model.{n}": p for n, p in control.named_parameters()}
    trainable.update({f"model.diffusion_model.{n}": p for n, p in unet.named_parameters()
                      if n.startswith(("output_blocks.", "out."))})
    for p in [*unet.parameters(), *control.parameters()]:
        p.requires_grad_(False)
    for p in trainable.values():
        p.requires_grad_(True)
    cond = {"c_crossattn": [x["context"]], "c_concat_mask": [x["mask_hint"]], "c_concat_image": [x["image_hint"]]}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # p_losses prints every term's batch mean
        loss, _ = host.p_losses(x["z0"], cond, x["t"], noise=x["noise"])
    loss.backward()
    terms = {}
    for line in printed.getvalue().splitlines():
        key, _, value = line.partition(":")
        terms[key.strip()] = float(value)
    grads = {f"model.diffusion_model.{n}": p.grad for n, p in unet.named_parameters() if p.grad is not None}
    grads.update({f"control_model.{n}": p.grad for n, p in control.named_parameters() if p.grad is not None})
    assert set(grads) <= set(trainable), "a frozen parameter received a gradient"
    return {"loss": loss.item(), "printed_term_means": terms, "n_grads": len(grads)}, grads


def _load(unet, control, weights: dict) -> None:
    prefixes = {"model.diffusion_model.": unet, "control_model.": control}
    for prefix, net in prefixes.items():
        own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        net.load_state_dict(own, strict=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", type=Path, required=True, help="checkout of the released Siamese-Diffusion")
    parser.add_argument("--check", action="store_true", help="compare with golden_tiny.json instead of writing it")
    parser.add_argument("--weights", type=Path, help="weights file (original key names) instead of the recipe")
    parser.add_argument("--inputs", type=Path, help="inputs file (z0, context, noise, mask_hint, image_hint, t)")
    parser.add_argument("--step", type=int, default=2500, help="training step of --inputs (default 2500)")
    parser.add_argument("--grads", type=Path, help="full gradient file to compare with (with --weights/--inputs)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    side, control_cls, unet_cls, ldm_cls = _released(args.original)
    import golden
    import torch

    torch.set_num_threads(2)
    unet, control = _networks(control_cls, unet_cls)
    names = {f"model.diffusion_model.{k}": v.shape for k, v in unet.state_dict().items()}
    names.update({f"control_model.{k}": v.shape for k, v in control.state_dict().items()})

    if args.weights is not None:
        from safetensors.torch import load_file

        _load(unet, control, load_file(args.weights))
        summary, grads = run_case(side, ldm_cls, unet, control, load_file(args.inputs), args.step)
        print(json.dumps(summary, indent=1))
        if args.grads is not None:
            ref = load_file(args.grads)
            scale = max(g.abs().max().item() for g in ref.values())
            worst = max(((grads[k] - g).abs().max().item() / scale, k) for k, g in ref.items())
            print(f"same names: {set(ref) == set(grads)}; largest |diff| / max|grad|: {worst[0]:.3g} ({worst[1]})")
        return 0

    _load(unet, control, {k: torch.from_numpy(golden.weight(k, tuple(s))) for k, s in names.items()})
    result = {"about": "written by tests/reference/make_golden.py from the released Siamese-Diffusion code; "
                       "weights, inputs and fingerprints as tests/reference/golden.py defines them",
              "geometry": golden.GEOMETRY, "schedule": golden.SCHEDULE, "total_steps": golden.TOTAL_STEPS,
              "k_projections": golden.K_PROJECTIONS, "cases": {}}
    for case, spec in golden.CASES.items():
        x = {k: torch.from_numpy(v) for k, v in golden.inputs(case).items()}
        summary, grads = run_case(side, ldm_cls, unet, control, x, spec["step"])
        summary.update(step=spec["step"], t=spec["t"],
                       fingerprints={k: golden.fingerprint(k, g.numpy()) for k, g in sorted(grads.items())})
        result["cases"][case] = summary
        print(f"{case}: loss {summary['loss']:.7g}, {summary['n_grads']} gradients", file=sys.stderr)
    if args.check:
        ref = json.loads(OUT.read_text())
        bad = 0
        for case, got in result["cases"].items():
            want = ref["cases"][case]
            mism = golden.fingerprint_mismatches(got["fingerprints"], want["fingerprints"])
            print(f"{case}: loss {got['loss']:.9g} vs {want['loss']:.9g}; fingerprint mismatches: {mism[:5]}")
            bad += len(mism) + (abs(got["loss"] - want["loss"]) > 1e-5 * abs(want["loss"]))
        return 1 if bad else 0
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    tmp.replace(OUT)
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

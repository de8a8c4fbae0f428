"""Training checkpoints on disk: complete or not, the newest complete one, safe to unpickle or not, re-partitioned
for another number of ranks, consolidated into one state dict.

* **Completeness.** A checkpoint is written under ``step=N.ckpt.partial`` by every rank, a completion marker
  (``complete.json``: world size, every file and its size) is written last, and only then is it renamed to
  ``step=N.ckpt`` (``cldm.strategy``). ``find_latest_checkpoint`` takes the newest complete one and names the
  incomplete ones it skips (a job killed while saving, a file truncated since).
* **Vetting.** DeepSpeed's reader unpickles its files in full; ``vet_checkpoint`` lists the Python globals each file
  would import without executing anything and refuses anything beyond numpy arrays and DeepSpeed's own types, before
  any loader touches the files (resume and conversion alike), unless the user opts in with ``--unsafe-pickle``.
* **Another world size.** ZeRO-2 partitions the optimizer state per rank; resuming on another number of ranks
  goes through DeepSpeed's universal checkpoint format (``deepspeed.checkpoint.ds_to_universal``: every parameter's
  fp32 value and AdamW moments whole), which the engine re-partitions on load (``load_universal``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

from ldm.checkpoint import foreign_globals
from ldm.fileio import replace_dir, restore_dir, write_json_atomic

import torch

log = logging.getLogger(__name__)

MARKER = "complete.json"
PARTIAL_SUFFIX = ".partial"
_STEP_RE = re.compile(r"step=(\d+)")
# Prefix Lightning 1.x put in front of every key (``LightningDeepSpeedModule`` wrapper); 2.x no longer does.
_WRAPPER_PREFIX = "_forward_module."
_OPTIM_SHARD = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"


# -- completeness ---------------------------------------------------------------------------------------------------
def write_marker(directory: Path, world_size: int) -> None:
    """Record every file of a finished checkpoint with its size; written last (atomically)."""
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
             if p.is_file() and p.name != MARKER}
    write_json_atomic(directory / MARKER, {"world_size": world_size, "files": files}, indent=1)


def incomplete_reason(path: Path) -> str | None:
    """Why ``path`` (a ``step=N.ckpt`` file or ZeRO directory) cannot be resumed from, or None when it is complete.

    Directories need the marker and every file it lists at its recorded size; a single-file checkpoint is complete
    when it exists (it is written to a temporary name and renamed)."""
    if path.is_file():
        return None
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} (the save did not finish)"
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return f"unreadable {MARKER}"
    for name, size in recorded.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def find_latest_checkpoint(directory: Path, *, warn: bool = True) -> Path | None:
    """The newest complete checkpoint in ``directory``: the highest ``step=N``; among equal steps (a run resumed
    from an older checkpoint writes ``step=N-v1.ckpt`` beside ``step=N.ckpt``) the most recently written. Incomplete
    ones are skipped, each named in a warning. A replacement that a crash interrupted (the previous directory of
    a name parked as ``.NAME.old``, ``ldm.fileio.swap_dir``) is finished first, so that checkpoint is not lost."""
    if not directory.is_dir():
        return None
    for parked in directory.glob(".*.ckpt.old"):
        if restore_dir(directory / parked.name[1:-len(".old")]):
            log.warning("restored %s: a crash had interrupted its replacement", parked.name[1:-len(".old")])
    found = sorted(((int(m.group(1)), p.stat().st_mtime_ns, p) for p in directory.glob("*.ckpt")
                    if (m := _STEP_RE.search(p.name))), reverse=True)
    for _, _, path in found:
        reason = incomplete_reason(path)
        if reason is None:
            return path
        if warn:
            log.warning("skipping incomplete checkpoint %s: %s", path, reason)
    return None


# -- ZeRO directories -----------------------------------------------------------------------------------------------
def _locate_zero_checkpoint(path: Path) -> tuple[Path, str]:
    """Return (directory holding ``latest``, tag) for a Lightning/DeepSpeed ZeRO checkpoint path.

    Lightning's ``epoch=E-step=S.ckpt`` is a directory with a ``latest`` file (holding the tag, "checkpoint") and
    the tag folder with ``mp_rank_00_model_states.pt`` and one ``*_optim_states.pt`` per data-parallel rank. The
    tag folder itself is accepted too.
    """
    if not path.exists():
        raise FileNotFoundError(f"ZeRO checkpoint {str(path)!r} does not exist.")
    if not path.is_dir():
        raise ValueError(
            f"{str(path)!r} is a file, not a ZeRO checkpoint directory (expected a directory with 'latest' and a tag "
            "folder, as written by DeepSpeedStrategy)."
        )
    latest = path / "latest"
    if latest.is_file():
        root, tag = path, latest.read_text().strip()
    elif (path / "mp_rank_00_model_states.pt").is_file():
        root, tag = path.parent, path.name
    else:
        raise ValueError(
            f"{str(path)!r} is not a ZeRO checkpoint directory: expected a 'latest' file or "
            "'mp_rank_00_model_states.pt' in it."
        )
    tag_dir = root / tag
    if not (tag_dir / "mp_rank_00_model_states.pt").is_file() or not any(tag_dir.glob("*_optim_states.pt")):
        raise ValueError(
            f"ZeRO checkpoint {str(tag_dir)!r} is incomplete: expected 'mp_rank_00_model_states.pt' and "
            "'*_optim_states.pt' files."
        )
    return root, tag


# Every global that DeepSpeed / Lightning checkpoints of this framework pickle beyond torch's safe set: numpy RNG
# states, DeepSpeed's loss scaler, ZeRO stage enum and fragment addresses. Anything else is refused by default.
ZERO_PICKLE_GLOBALS = frozenset({
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "numpy.dtypes.UInt32DType", "numpy.dtypes.Int64DType", "numpy.dtypes.Float64DType",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
})


def zero_pickle_globals() -> list[Any]:
    """The objects named in ``ZERO_PICKLE_GLOBALS`` that this installation has (for ``weights_only`` loading)."""
    found = []
    for name in sorted(ZERO_PICKLE_GLOBALS):
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # e.g. numpy 1.x has no numpy._core; deepspeed renamed a class
            continue
    return found


def vet_checkpoint(path: str | Path, *, unsafe_pickle: bool = False) -> None:
    """Refuse a training checkpoint whose pickles would import anything beyond ``ZERO_PICKLE_GLOBALS``.

    ``path``: a ZeRO directory (``step=N.ckpt/``, its tag folder) or a single-file Lightning checkpoint. Nothing is
    executed: the pickle opcodes are read. Call it before DeepSpeed's or Lightning's loader opens the files.
    """
    path = Path(path)
    if unsafe_pickle:
        return
    if path.is_file():
        files = [path]
    else:
        root, tag = _locate_zero_checkpoint(path)
        files = sorted((root / tag).glob("*.pt"))
    for file in files:
        foreign = foreign_globals(file, ZERO_PICKLE_GLOBALS)
        if foreign:
            raise ValueError(f"{file}: would import {', '.join(foreign[:5])} when unpickled, which a training "
                             "checkpoint never needs; if you trust this file, pass --unsafe-pickle")


def saved_world_size(path: str | Path) -> int | None:
    """The number of data-parallel ranks a ZeRO checkpoint was written by (its optimizer shards); None for a
    single-file checkpoint."""
    path = Path(path)
    if path.is_file():
        return None
    root, tag = _locate_zero_checkpoint(path)
    return len(list((root / tag).glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def to_universal(path: str | Path, out: str | Path) -> Path:
    """Convert a ZeRO-2 checkpoint to DeepSpeed's universal format in ``out`` (returned; reused when complete).

    The universal format stores every parameter's fp32 value and AdamW moments whole, so an engine with another
    number of ranks re-partitions them on load (engine config ``checkpoint.load_universal``). ``out`` appears only
    when complete (written beside it and renamed). Vet the source first (``vet_checkpoint``): the converter
    unpickles it.
    """
    from deepspeed.checkpoint import ds_to_universal

    root, tag = _locate_zero_checkpoint(Path(path))
    out = Path(out)
    if (out / "latest_universal").is_file():
        return out
    with replace_dir(out) as partial:
        args = argparse.Namespace(input_folder=str(root / tag), output_folder=str(partial / tag),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            ds_to_universal.main(args)
        log.debug("ds_to_universal %s: %s", root / tag, captured.getvalue().strip()[-2000:])
        (partial / "latest_universal").write_text(tag, encoding="utf-8")
    return out


def zero_checkpoint_to_state_dict(ckpt_dir: str | Path, *, unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Consolidate a ZeRO-2/3 checkpoint directory into the LightningModule's state dict (CPU tensors).

    Accepts Lightning's ``.../epoch=E-step=S.ckpt/`` directory (or its tag folder). Trainable parameters come back
    as the optimizer's fp32 master weights (exactly the live values under fp32 training); frozen parameters and
    buffers are included in the dtype the module held them in (bf16 under DeepSpeed's bf16 precision). A
    ``_forward_module.`` prefix (Lightning 1.x checkpoints) is stripped. DeepSpeed's reader fully unpickles the
    files, so each is vetted first (``vet_checkpoint``) unless ``unsafe_pickle`` (for a file you trust).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = _locate_zero_checkpoint(Path(ckpt_dir))
    vet_checkpoint(root / tag, unsafe_pickle=unsafe_pickle)
    # DeepSpeed's converter print()s progress; keep library output in logging instead.
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    log.debug("zero_to_fp32 on %s: %s", root, captured.getvalue().strip())
    return {
        (key[len(_WRAPPER_PREFIX) :] if key.startswith(_WRAPPER_PREFIX) else key): value for key, value in state.items()
    }

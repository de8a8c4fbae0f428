"""Safe checkpoint I/O and key reports, in pure PyTorch + safetensors.

The original ControlNet / Siamese-Diffusion code loads checkpoints with bare ``torch.load`` (arbitrary code execution
on an untrusted pickle) and ``load_state_dict(strict=False)`` (silently training a half-initialised network). This
module replaces both: pickles are opened with ``weights_only=True`` unless the caller explicitly opts in, writes are
atomic, and loading into a module either matches every key and shape or fails with one line naming the culprits.
Only two families of keys are ever skipped, each with a logged note: ``model_ema.*`` (the EMA copy the original
training keeps beside the weights) and ``*.embeddings.position_ids`` (a buffer older CLIP text encoders saved).
"""

from __future__ import annotations

import logging
import os
import pickle
import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm.fileio import fsync_dir

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Wrappers around the real state dict: Lightning (and the original repo) write {"state_dict": ...}, DeepSpeed's
# mp_rank_00_model_states.pt holds {"module": ...}.
_WRAPPER_KEYS = ("state_dict", "module")
_LIST_LIMIT = 5  # how many key names an error message shows per category

ShapeLike = Tensor | torch.Size | Sequence[Any]


class CheckpointKeyError(ValueError):
    """A state dict does not match its module: keys missing, unexpected, or of the wrong shape."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe_directory(path: Path) -> str:
    """Why a folder is no checkpoint (one line): a diffusers folder, a ZeRO run (zero_to_fp32.py), or what it holds."""
    try:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError as exc:
        return f"{path} is a directory, not a checkpoint file, and cannot be listed ({exc.strerror})"
    names = {e.rstrip("/") for e in entries}
    parts = [p for p in ("unet/", "vae/", "text_encoder/") if p in entries]
    if "model_index.json" in names:
        what = "a diffusers pipeline folder (model_index.json): tool_add_control.py takes it, this step needs a file"
    elif parts:
        what = f"it holds {', '.join(parts)} like a diffusers pipeline folder, but no model_index.json"
    elif "config.json" in names and any(n.startswith(("diffusion_pytorch_model", "model.")) for n in names):
        what = "one part of a diffusers folder: pass the pipeline folder above it, the one with model_index.json"
    elif names & {"latest", "mp_rank_00_model_states.pt", "checkpoints"} or path.suffix == ".ckpt" or any(
            n.endswith(("_optim_states.pt", ".ckpt")) for n in names):
        what = "a DeepSpeed ZeRO checkpoint or training run: convert it with zero_to_fp32.py first"
    else:
        more = f", ... {len(entries) - _LIST_LIMIT} more" if len(entries) > _LIST_LIMIT else ""
        what = (f"it holds {', '.join(entries[:_LIST_LIMIT]) + more or 'nothing'} (expected a checkpoint file, a "
                "diffusers folder with model_index.json, or a DeepSpeed ZeRO checkpoint for zero_to_fp32.py)")
    return f"{path} is a directory, not a checkpoint file: {what}"


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(describe_directory(path))


def _load_pickle(path: Path, *, unsafe_pickle: bool, map_location: str | torch.device,
                 allowed_globals: Sequence[Any] = ()) -> Any:
    if unsafe_pickle:
        # Explicit opt-in by the user (--unsafe-pickle) for a file they trust; this can execute code in the file.
        logger.warning("loading %s with full unpickling (--unsafe-pickle): only do this for trusted files", path)
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        # allowed_globals: classes/functions a caller knows its files hold (e.g. numpy arrays of an RNG state).
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses both foreign objects and garbage; tell them apart by asking which globals it needs.
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip checkpoint at all: legacy format or corrupt
            unsafe = ["unknown"] if "Unsupported global" in str(exc) else []
        if unsafe:
            raise ValueError(
                f"{path}: contains non-tensor objects ({', '.join(unsafe[:_LIST_LIMIT])}) that safe loading refuses; "
                f"if you trust this file, pass --unsafe-pickle (unsafe_pickle=True), or convert it to .safetensors"
            ) from None
        raise ValueError(f"{path}: not a readable torch checkpoint ({_first_line(exc)})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(
            f"{path}: not a readable torch checkpoint, truncated or corrupt ({_first_line(exc)})"
        ) from None


def foreign_globals(path: str | os.PathLike[str], allowed: Collection[str] = ()) -> list[str]:
    """The Python globals a pickled checkpoint would import that are neither torch's safe set nor ``allowed``.

    Reads the pickle opcodes without executing anything (``torch.serialization.get_unsafe_globals_in_checkpoint``),
    so a file can be vetted before a loader that needs full unpickling (DeepSpeed's ZeRO reader) touches it.
    """
    path = Path(path)
    _check_readable(path)
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # not a zip checkpoint: legacy format or corrupt
        raise ValueError(f"{path}: not a readable torch checkpoint ({_first_line(exc)})") from None
    return sorted(set(found) - set(allowed))


def _unwrap(obj: Any, path: Path) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            dropped = sorted(str(k) for k in obj if k != key)
            if dropped:
                logger.debug("%s: using the nested %r dict; ignoring top-level entries %s", path, key, dropped)
            return _unwrap(inner, path)  # some merges nest {"state_dict": {"state_dict": ...}}
    return obj


def load_state_dict(
    path: str | os.PathLike[str],
    *,
    unsafe_pickle: bool = False,
    map_location: str | torch.device = "cpu",
    allowed_globals: Sequence[Any] = (),
) -> dict[str, Tensor]:
    """Read a flat ``{name: tensor}`` dict from a .safetensors, .ckpt, .pt, .pth or .bin file.

    Pickled files are loaded with ``weights_only=True`` (which may also build the objects in ``allowed_globals``)
    unless ``unsafe_pickle``; a nested ``state_dict`` (Lightning)
    or ``module`` (DeepSpeed) dict is unwrapped; non-tensor entries (e.g. ``epoch``) are dropped with a debug log.
    """
    path = Path(path)
    _check_readable(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        try:
            # safetensors takes device names as strings ("cpu", "cuda:0"), not torch.device objects.
            return load_file(path, device=str(map_location))
        except SafetensorError as exc:
            raise ValueError(
                f"{path}: not a valid safetensors file, truncated or corrupt ({_first_line(exc)})"
            ) from None
    if suffix not in PICKLE_SUFFIXES:
        known = ", ".join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
        raise ValueError(f"{path}: unknown checkpoint extension {suffix!r} (expected one of {known})")
    raw = _unwrap(_load_pickle(path, unsafe_pickle=unsafe_pickle, map_location=map_location,
                               allowed_globals=allowed_globals), path)
    state: dict[str, Tensor] = {}
    dropped: list[str] = []
    for key, value in raw.items():
        if isinstance(value, Tensor):
            state[str(key)] = value
        else:
            dropped.append(str(key))
    if dropped:
        logger.debug("%s: dropped %d non-tensor entries: %s", path, len(dropped), dropped[:_LIST_LIMIT])
    if not state:
        raise ValueError(f"{path}: holds no tensors (top-level keys: {sorted(map(str, raw))[:_LIST_LIMIT]})")
    return state


def _safetensors_ready(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detach, and clone tensors that safetensors refuses: non-contiguous ones and ones sharing storage (tied)."""
    seen_storage: set[int] = set()
    out: dict[str, Tensor] = {}
    for key, tensor in sd.items():
        tensor = tensor.detach()
        shared = False
        if tensor.numel() > 0:
            ptr = tensor.untyped_storage().data_ptr()
            shared = ptr in seen_storage
            seen_storage.add(ptr)
        out[key] = (
            tensor.clone(memory_format=torch.contiguous_format) if shared or not tensor.is_contiguous() else tensor
        )
    return out


def _validate_for_save(sd: Mapping[str, Any], metadata: Mapping[str, Any] | None, path: Path) -> None:
    for key, value in sd.items():
        if not isinstance(key, str):
            raise TypeError(f"cannot save {path}: state-dict key {key!r} is not a string")
        if not isinstance(value, Tensor):
            raise TypeError(f"cannot save {path}: value of {key!r} is a {type(value).__name__}, not a tensor")
        if value.is_meta:
            raise ValueError(f"cannot save {path}: {key!r} is a meta tensor (it holds no data)")
        if value.layout != torch.strided and path.suffix.lower() in SAFETENSORS_SUFFIXES:
            raise ValueError(f"cannot save {path}: {key!r} is a {value.layout} tensor; safetensors stores dense ones")
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"cannot save {path}: metadata must map str to str, got {key!r}: {type(value).__name__}")


def save_state_dict(
    sd: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``sd`` atomically: .safetensors (preferred), or .ckpt/.pt/.pth as ``torch.save({"state_dict": sd})``.

    The data goes to a temporary file in the target directory, is fsynced, then renamed over ``path``, so a crash
    never leaves a half-written checkpoint under the final name. Refuses an existing ``path`` unless ``overwrite``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + (".ckpt", ".pt", ".pth"):
        raise ValueError(f"cannot save {path}: unknown extension {suffix!r} (use .safetensors, .ckpt, .pt or .pth)")
    _validate_for_save(sd, metadata, path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot save {path}: it is a directory")
    if path.exists() and not overwrite:
        raise FileExistsError(f"refusing to overwrite {path} (pass overwrite=True / --force)")
    directory = path.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot save {path}: directory {directory} does not exist")

    tmp = directory / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        # O_EXCL: never clobber a file of the same name; mode 0o666 lets the umask decide the final permissions.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise PermissionError(f"cannot save {path}: directory {directory} is not writable ({exc.strerror})") from None
    mode = os.fstat(fd).st_mode & 0o777  # what the umask allows; safetensors writes via its own 0600 temp file
    try:
        if suffix in SAFETENSORS_SUFFIXES:
            os.close(fd)
            save_file(_safetensors_ready(sd), tmp, metadata=dict(metadata) if metadata else None)
            os.chmod(tmp, mode)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        else:
            payload: dict[str, Any] = {"state_dict": dict(sd)}
            if metadata:
                payload["metadata"] = dict(metadata)
            with os.fdopen(fd, "wb") as handle:
                torch.save(payload, handle)
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a checkpoint: the safetensors header, or the ``metadata`` entry save_state_dict
    writes into .ckpt/.pt/.pth files. Empty when there is none."""
    path = Path(path)
    _check_readable(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        try:
            with safe_open(path, framework="pt") as handle:
                return dict(handle.metadata() or {})
        except SafetensorError as exc:
            raise ValueError(
                f"{path}: not a valid safetensors file, truncated or corrupt ({_first_line(exc)})"
            ) from None
    if suffix in PICKLE_SUFFIXES:
        obj = _load_pickle(path, unsafe_pickle=False, map_location="cpu")
        meta = obj.get("metadata") if isinstance(obj, Mapping) else None
        return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, Mapping) else {}
    raise ValueError(f"{path}: unknown checkpoint extension {suffix!r}")


@dataclass(frozen=True)
class KeyReport:
    """How a state dict matches what a module (or a reference manifest) expects."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    matched: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def summary(self, limit: int = _LIST_LIMIT) -> str:
        """One line: counts per problem with the first ``limit`` key names of each."""

        def names(items: Sequence[str]) -> str:
            more = f", ... {len(items) - limit} more" if len(items) > limit else ""
            return ", ".join(items[:limit]) + more

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({names(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({names(self.unexpected)})")
        if self.shape_mismatch:
            shapes = [f"{k}: expected {list(e)}, got {list(g)}" for k, e, g in self.shape_mismatch]
            parts.append(f"{len(self.shape_mismatch)} with wrong shape ({names(shapes)})")
        if not parts:
            parts.append(f"all {self.matched} keys match")
        if self.ignored:
            parts.append(f"{len(self.ignored)} ignored")
        return "; ".join(parts)

    def raise_if_bad(self, context: str) -> None:
        """Raise CheckpointKeyError (a ValueError) with ``context`` and the summary unless every key matched."""
        if not self.ok:
            raise CheckpointKeyError(f"{context}: {self.summary()}")


def _as_shape(value: ShapeLike) -> tuple[int, ...]:
    """A shape from a tensor, a torch.Size / sequence of ints, or a reference-manifest entry ``[shape, dtype]``."""
    if hasattr(value, "shape"):
        return tuple(int(d) for d in value.shape)
    if len(value) > 0 and isinstance(value[0], (list, tuple)):
        return tuple(int(d) for d in value[0])
    return tuple(int(d) for d in value)


def _is_ignored(key: str, prefixes: Sequence[str], suffixes: Sequence[str]) -> bool:
    return key.startswith(tuple(prefixes)) or key.endswith(tuple(suffixes))


def compare_keys(
    expected: Mapping[str, ShapeLike],
    got: Mapping[str, ShapeLike],
    *,
    ignore_prefixes: Sequence[str] = (),
    ignore_suffixes: Sequence[str] = (),
) -> KeyReport:
    """Compare key sets and shapes. Keys matching an ignore prefix/suffix are left out on both sides (listed in
    ``ignored``); ``missing`` keeps the order of ``expected``, ``unexpected`` the order of ``got``."""
    ignored = [k for k in got if _is_ignored(k, ignore_prefixes, ignore_suffixes)]
    ignored += [k for k in expected if k not in got and _is_ignored(k, ignore_prefixes, ignore_suffixes)]
    skip = set(ignored)
    missing = [k for k in expected if k not in got and k not in skip]
    unexpected = [k for k in got if k not in expected and k not in skip]
    mismatch = []
    matched = 0
    for key, value in got.items():
        if key in expected and key not in skip:
            want, have = _as_shape(expected[key]), _as_shape(value)
            if want != have:
                mismatch.append((key, want, have))
            else:
                matched += 1
    return KeyReport(missing, unexpected, mismatch, ignored, matched)


def load_strict(
    module: nn.Module,
    sd: Mapping[str, Tensor],
    *,
    ignore_prefixes: Sequence[str] = ("model_ema.",),
    ignore_suffixes: Sequence[str] = ("embeddings.position_ids",),
) -> KeyReport:
    """Load ``sd`` into ``module`` only if every key and shape matches (``strict=True`` semantics).

    Keys matching ``ignore_prefixes`` / ``ignore_suffixes`` are skipped on both sides with a logged note (the module
    keeps its own values for them); any other difference raises CheckpointKeyError listing the offending keys.
    """
    expected = module.state_dict()
    report = compare_keys(expected, sd, ignore_prefixes=ignore_prefixes, ignore_suffixes=ignore_suffixes)
    name = type(module).__name__
    if report.ignored:
        logger.info("%s: ignoring %d checkpoint keys (e.g. %s)", name, len(report.ignored), report.ignored[0])
    report.raise_if_bad(f"cannot load state dict into {name}")
    skip = set(report.ignored)
    result = module.load_state_dict({k: v for k, v in sd.items() if k not in skip}, strict=False)
    # Guard against load-time hooks that rename keys: anything the comparison did not foresee is still an error.
    late = KeyReport(missing=[k for k in result.missing_keys if k not in skip], unexpected=list(result.unexpected_keys))
    late.raise_if_bad(f"cannot load state dict into {name}")
    return report


def filter_prefix(sd: Mapping[str, Tensor], prefix: str, strip: bool = True) -> dict[str, Tensor]:
    """The entries under ``prefix`` (a dot is appended when missing, so ``"control_model"`` does not also match
    ``"control_model_ema.*"``), with the prefix removed when ``strip``."""
    if prefix and not prefix.endswith("."):
        prefix += "."
    return {(k[len(prefix) :] if strip else k): v for k, v in sd.items() if k.startswith(prefix)}

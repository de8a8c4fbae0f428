"""Crash-safe file and folder writes: the one implementation every layer uses.

A file is written under a hidden temporary name in its own directory and renamed over the target
(``os.replace`` is atomic on POSIX and Windows): a reader, or a run killed midway, sees the old file or the new one,
never a truncated one. A folder is built complete under a hidden temporary name beside the target and swapped in:
the old folder is first renamed to ``.<name>.old`` (a fixed name, so it can be found), the new one renamed into
place, then the old one deleted. A crash between the two renames leaves ``.<name>.old`` and no ``<name>``;
``restore_dir`` (called by ``replace_dir`` before it starts, and by readers that care) puts it back, so a crash
leaves the old output or the new one, never neither.

Pure standard library: this module sits in the lowest layer so ``ldm``'s checkpoint writer, ``cldm``'s
checkpoint directories and every tool share it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "copy_file_atomic", "file_sha256", "fsync_dir", "old_dir", "replace_dir", "restore_dir",
           "swap_dir", "temp_sibling", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = 16 << 20) -> str:
    """SHA-256 of a file, streamed in chunks (checkpoints are several GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename in ``directory`` durable (best effort: not every platform or file system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_sibling(path: str | os.PathLike[str], tag: str = "tmp") -> Path:
    """A hidden name beside ``path``, unique to this call, keeping ``path``'s suffix (writers such as
    ``cv2.imwrite`` and ``savefig`` choose the format from it): ``.<stem>.<pid>.<random>.<tag><suffix>``."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(3)}.{tag}{path.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it is renamed over ``path``, on any error
    deleted (``path`` untouched). For writers that take a file name::

        with atomic_path(out / "plot.png") as tmp:
            figure.savefig(tmp)
    """
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {path}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` via a temporary name; returns ``path``. ``durable``: fsync the file before the
    rename (off for bulk outputs such as generated images, where a manifest decides what is complete)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` via a temporary name; returns ``path``."""
    return write_bytes_atomic(path, text.encode(encoding))


def write_json_atomic(path: str | os.PathLike[str], obj: Any, indent: int | None = 2, **kwargs: Any) -> Path:
    """``json.dumps(obj)`` plus a newline to ``path`` via a temporary name; returns ``path``."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


def copy_file_atomic(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy ``src`` to ``dst`` via a temporary name beside ``dst``; returns ``dst``."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def old_dir(final: str | os.PathLike[str]) -> Path:
    """Where ``swap_dir`` parks the previous ``final`` while swapping: ``.<name>.old`` beside it."""
    final = Path(final)
    return final.with_name(f".{final.name}.old")


def restore_dir(final: str | os.PathLike[str]) -> bool:
    """Finish a swap a crash interrupted. ``.<name>.old`` without ``<name>``: the crash fell between the two renames,
    so the old folder is put back (returns True). Both present: the new folder is in place and only the deletion
    of the old one was lost; it is deleted now."""
    final, old = Path(final), old_dir(final)
    if not old.exists():
        return False
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        return False
    os.replace(old, final)
    return True


def swap_dir(new: str | os.PathLike[str], final: str | os.PathLike[str]) -> Path:
    """Rename the complete folder ``new`` to ``final``, replacing a folder already there (moved to
    ``.<name>.old``, then deleted once ``new`` is in place). Both must be on the same file system."""
    new, final = Path(new), Path(final)
    restore_dir(final)
    if final.exists():
        old = old_dir(final)
        os.replace(final, old)
        try:
            os.replace(new, final)
        except BaseException:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, final)
    fsync_dir(final.parent)
    return final


@contextmanager
def replace_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final`` (parent folders created) to build the new output in; on
    success it replaces ``final`` (``swap_dir``), on any error it is deleted and ``final`` is untouched::

        with replace_dir(out) as tmp:
            write_everything(tmp)
    """
    final = Path(final)
    restore_dir(final)
    tmp = temp_sibling(final, "partial")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        swap_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

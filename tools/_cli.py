"""What every command-line tool here shares: logging set-up, one-line errors with exit codes, output checks.

A tool's ``main`` calls ``run(body, args)``: user errors (bad config, missing file, wrong keys, existing output)
end as one ``ERROR`` line and a non-zero exit code instead of a traceback; ``--verbose`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path

from siamese.config import ConfigError

logger = logging.getLogger("siamese.tools")
WRITABLE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")  # what ldm.checkpoint.save_state_dict writes

EXIT_USAGE = 2  # bad configuration or arguments
EXIT_FAILURE = 1  # bad input files, refused writes
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


def make_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the module docstring's first paragraph and whose epilog is the rest."""
    head, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=head, epilog=rest,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--unsafe-pickle", action="store_true",
                        help="allow pickled checkpoints holding arbitrary Python objects (trusted files only)")
    parser.add_argument("-v", "--verbose", action="store_true", help="list key names, debug logging, tracebacks")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # DeepSpeed's and Lightning's own chatter is noise in a conversion tool.
    for name in ("DeepSpeed", "deepspeed", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


def run(body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a tool body; user errors become one logged line and an exit code."""
    setup_logging(getattr(args, "verbose", False))
    try:
        return body(args)
    except KeyboardInterrupt:
        logger.error("interrupted: finished outputs are kept, nothing half-written is left; re-run to resume")
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        logger.error("%s", exc, exc_info=args.verbose)
        return EXIT_USAGE
    except (ValueError, OSError, KeyError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logger.error("%s", message, exc_info=args.verbose)
        return EXIT_FAILURE


def check_output(path: Path, *, force: bool) -> Path:
    """Fail early (before hours of work or gigabytes of reading) if ``path`` cannot be written."""
    if path.suffix.lower() not in WRITABLE_SUFFIXES:
        raise ValueError(f"output {path}: unknown extension {path.suffix!r} (use {', '.join(WRITABLE_SUFFIXES)})")
    if path.is_dir():
        raise IsADirectoryError(f"output {path} is a directory; give a file name")
    if path.exists() and not force:
        raise FileExistsError(f"output {path} exists; pass --force to overwrite it")
    parent = path.parent
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: directory {parent} is not writable")
    return path


def check_output_dir(path: Path, *, force: bool) -> Path:
    """``check_output`` for a tool whose output is a folder (written beside it under a temporary name)."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output {path} is a file; give a folder name")
    if path.exists() and not force:
        raise FileExistsError(f"output {path} exists; pass --force to replace it")
    parent = path.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: directory {parent} is not writable")
    return path


def list_keys(title: str, keys: list[str], verbose: bool) -> None:
    """Log a key category: its count, and the names with --verbose."""
    if not keys:
        return
    logger.info("%s: %d", title, len(keys))
    for key in keys if verbose else ():
        logger.info("    %s", key)

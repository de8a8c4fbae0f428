"""The dataset layout on disk: a folder with a JSONL ``prompt.json`` whose lines are
``{"source": mask, "target": image, "prompt": text}`` (ControlNet's tutorial layout and the released
Siamese-Diffusion code's).

Paths are absolute or relative to the JSONL's folder (then to the working directory, as the released code opened
them). Every problem raises one line naming the file and line number; ``python -m tools.doctor`` lists them all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_PROMPT", "PROMPT_FILE", "PairRecord", "parse_prompt_line", "read_prompt_jsonl",
           "resolve_record_path"]

PROMPT_FILE = "prompt.json"
DEFAULT_PROMPT = "A photo of a polyp."  # the prompt the authors used for every polyp image


@dataclass(frozen=True)
class PairRecord:
    """One line of ``prompt.json``: resolved mask path, image path (None when not required) and prompt."""

    source: Path
    target: Path | None
    prompt: str


def resolve_record_path(value: object, key: str, base: Path, where: str) -> Path:
    """The file a ``source``/``target`` value names: absolute, or relative to ``base`` (the JSONL's folder) and
    then to the working directory. Raises ValueError for a non-string value, FileNotFoundError for no file."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: key '{key}' must be a non-empty string path, got {value!r}")
    path = Path(value).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        # Relative to the JSONL's folder (ControlNet layout); the released Siamese code opened paths relative to the
        # working directory, so accept that as a fallback to run existing prompt.json files unchanged.
        candidates = [base / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{where}: '{key}' file not found: {value} (looked in {', '.join(map(str, candidates))})")


def parse_prompt_line(text: str, *, require_target: bool = True) -> dict:
    """Parse and check one non-blank JSONL line; ValueError says what is wrong (without the location).

    Checks the JSON, that it is an object, the keys (source, prompt and, with ``require_target``, target), that
    the prompt is a string and that the paths are non-empty strings. Files are not looked up here.
    """
    try:
        item = json.loads(text)
    except json.JSONDecodeError as error:
        hint = " (expected one JSON object per line, not a JSON array)" if text.startswith("[") else ""
        raise ValueError(f"invalid JSON: {error.msg} at column {error.colno}{hint}") from None
    if not isinstance(item, dict):
        raise ValueError(f"expected a JSON object with source/target/prompt, got {type(item).__name__}")
    needed = ("source", "target", "prompt") if require_target else ("source", "prompt")
    missing = [key for key in needed if key not in item]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)} (expected {', '.join(needed)})")
    if not isinstance(item["prompt"], str):
        raise ValueError(f"key 'prompt' must be a string, got {item['prompt']!r}")
    for key in needed[:-1]:
        if not isinstance(item[key], str) or not item[key]:
            raise ValueError(f"key '{key}' must be a non-empty string path, got {item[key]!r}")
    return item


def read_prompt_jsonl(path: str | Path, *, require_target: bool = True) -> list[PairRecord]:
    """Parse a JSONL prompt file into records, checking that every referenced file exists.

    Relative paths are resolved against the file's folder first, then the current directory. Blank lines are
    skipped. Every problem raises one line naming the file and line number (``python -m tools.doctor`` lists all).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    base = path.resolve().parent
    records: list[PairRecord] = []
    with path.open("r", encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            where = f"{path}:{lineno}"
            try:
                item = parse_prompt_line(text, require_target=require_target)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
            source = resolve_record_path(item["source"], "source", base, where)
            target = resolve_record_path(item["target"], "target", base, where) if require_target else None
            records.append(PairRecord(source=source, target=target, prompt=item["prompt"]))
    if not records:
        raise ValueError(f"{path}: no records (the file is empty; expected JSONL lines with source/target/prompt)")
    return records

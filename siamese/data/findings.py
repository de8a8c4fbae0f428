"""Findings of a dataset check: what each kind of problem means, how it is counted, and the plain-text table.

A finding is one kind of problem (severity ``error``, ``warning`` or ``info``, a code, a count and a few example
files), not one line per file: a dataset of 10,000 pairs with one systematic problem gives one row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["EXAMPLES", "SEVERITIES", "WHAT", "Finding", "Findings", "format_findings"]

SEVERITIES = ("error", "warning", "info")
EXAMPLES = 3  # example files kept per finding

# What each code means; the table shows this unless a finding has a more specific text.
WHAT = {
    "bad_line": "prompt.json lines that training cannot parse",
    "no_records": "prompt.json has no records",
    "missing_file": "referenced files that do not exist",
    "unreadable_file": "files that cannot be read or decoded as images",
    "aspect_mismatch": "image and mask aspect ratios differ: the pair cannot line up",
    "size_mismatch": "image and mask sizes differ (same aspect ratio): both are resized, the pair still lines up",
    "label_mask": "label masks (class values ≤ 127: 0/1, 0/k, class maps)",
    "multiclass_mask": "multi-class masks (3+ distinct classes): all classes above the threshold merge into one "
                       "foreground, the others into background",
    "nonbinary_mask": "non-binary masks (soft edges or JPEG noise): binarised at the threshold",
    "colour_mask": "two-colour masks: reduced to gray (luma, as PIL convert('L')) before the threshold",
    "empty_mask": "masks that are all background after binarisation",
    "full_mask": "masks that are all foreground after binarisation",
    "duplicate_image": "the same image content (sha256) used by several records under different paths",
    "duplicate_path": "the same file path used by several records",
    "gray_image": "single-channel (gray) images: read as RGB with the gray value replicated to 3 channels",
    "image_16bit": "16-bit or float images: mapped to 8 bit by data.intensity (auto: 12-bit data ×255/4095, other "
                   "16-bit ÷257, float [0, 1] ×255)",
    "near_black_image": "images whose brightest pixel reads below 32 of 255 as training sees them (a narrow "
                        "intensity range: choose data.intensity)",
    "alpha_image": "images with an alpha channel: the alpha channel is dropped (not composited)",
    "small_image": "images smaller than the training resolution: upsampled (bicubic)",
    "non_square": "non-square images: squashed to a square (the aspect ratio is not kept, as in the original)",
    "checked": "pairs read and checked",
}


@dataclass
class Finding:
    """One kind of problem: how bad, what, how many records or lines, and a few examples (file names, lines)."""

    severity: str
    code: str
    what: str
    count: int = 0
    examples: list[str] = field(default_factory=list)


class Findings:
    """The findings of one check, by code (the first-seen order kept within a severity)."""


    def __init__(self) -> None:
        self._by_code: dict[str, Finding] = {}

    def add(self, severity: str, code: str, example: str | None = None, count: int = 1) -> Finding:
        finding = self._by_code.get(code)
        if finding is None:
            finding = self._by_code[code] = Finding(severity, code, WHAT[code])
        finding.count += count
        if example is not None and len(finding.examples) < EXAMPLES:
            finding.examples.append(example)
        return finding

    def get(self, code: str) -> Finding | None:
        return self._by_code.get(code)

    def sorted(self) -> list[Finding]:
        order = {severity: rank for rank, severity in enumerate(SEVERITIES)}
        return sorted(self._by_code.values(), key=lambda f: order[f.severity])  # stable: first-seen order within


def format_findings(findings: Iterable[Finding], width: int = 110) -> str:
    """A plain-text table, one row per finding (severity, code, count, what) with its examples indented below."""
    findings = list(findings)
    rows = [("SEVERITY", "CODE", "COUNT", "WHAT")] + [(f.severity, f.code, str(f.count), f.what) for f in findings]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    indent = sum(widths) + 6
    lines = []
    for index, (severity, code, count, what) in enumerate(rows):
        head = f"{severity:<{widths[0]}}  {code:<{widths[1]}}  {count:>{widths[2]}}  "
        lines.extend(_wrap(head, what, indent, width))
        if index:
            for example in findings[index - 1].examples:
                lines.extend(_wrap(" " * indent + "e.g. ", example, indent + 5, width))
    return "\n".join(lines) + "\n"


def _wrap(head: str, text: str, indent: int, width: int) -> list[str]:
    """``head + text`` broken at spaces so lines fit ``width``; continuation lines indented by ``indent``."""
    room = max(width - indent, 30)
    words, lines, current = text.split(" "), [], ""
    for word in words:
        if current and len(current) + 1 + len(word) > room:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return [head + lines[0]] + [" " * indent + line for line in lines[1:]]

"""Sizes as people write them: 32M, 1.5GiB, 4096."""

from __future__ import annotations

import re

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of "32M", "32MiB", "32MB" (all binary: 2^20) or a plain number."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if m is None:
        raise ValueError(f"not a size: {text!r} (say e.g. 512M or 2G)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])

"""Locate the read-only real data in ../shared beside the checkout.

Missing data is a broken set-up, not a reason to skip: the lookup fails loudly.
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED = Path(os.environ.get("ACEMATH_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def shared_path(relative: str) -> Path:
    path = SHARED / relative
    assert path.exists(), f"shared data missing: {path} (expected the read-only ../shared beside the checkout)"
    return path

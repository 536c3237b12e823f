"""Converter outputs appear complete or not at all: written into ``OUT.partial`` and renamed at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def staged_output_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory that replaces ``out_dir`` on success and is removed on failure.

    A non-empty ``out_dir`` is refused unless ``overwrite``, so an earlier result is never lost by mistake.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)

"""Files that appear whole or not at all: a killed job (Slurm's time limit, a preemption) leaves the previous
version or nothing, never a torn file that a resumed run or a reader would take for a complete one."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator

PARTIAL_FILE_SUFFIX = ".partial"


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[IO[str]]:
    """A text stream onto ``<path>.partial``, renamed over ``path`` when the block ends; removed if it raises."""
    path = Path(path)
    partial = path.with_name(path.name + PARTIAL_FILE_SUFFIX)
    try:
        with partial.open("w", encoding="utf-8") as stream:
            yield stream
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


def write_atomically(path: str | Path, text: str) -> None:
    with atomic_output(path) as stream:
        stream.write(text)

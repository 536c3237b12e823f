"""launch/ is a folder of scripts, not a package: tests load a script's ``main`` by path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def launch_main(script: str):
    """``main`` of ``launch/<script>.py``."""
    spec = importlib.util.spec_from_file_location(f"launch_{script}", LAUNCH / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main

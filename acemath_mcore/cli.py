"""How the command-line tools end on bad input: one ``error:`` line, no traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable


def exit_on_input_errors(main: Callable[[], int]) -> int:
    """Run a tool's ``main``. A missing file or an invalid value, whose messages name the path or setting at fault,
    ends it with ``<tool>: error: ...`` and status 2; ``ACEMATH_TRACEBACK=1`` re-raises for the full traceback."""
    try:
        return main()
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        if os.environ.get("ACEMATH_TRACEBACK") == "1":
            raise
        print(f"{Path(sys.argv[0]).name}: error: {error} (ACEMATH_TRACEBACK=1 shows where)", file=sys.stderr)
        return 2

"""The one debug switch, GDSL_DEBUG, that every layer may import (it imports nothing of gdsl).

    GDSL_DEBUG=1  the IR of each traced program (and autotune / launch decisions)
    GDSL_DEBUG=2  + the plan
    GDSL_DEBUG=3  + the generated source
    GDSL_DEBUG=4  + compile and launch timings
"""
from __future__ import annotations

import os
import sys


def debug_level() -> int:
    """The GDSL_DEBUG level (0 when unset; 1 when set to something that is not a number)."""
    try:
        return int(os.environ.get("GDSL_DEBUG", "0") or 0)
    except ValueError:
        return 1


def debug(level: int, what: str, text) -> None:
    """Print `text` to stderr under the heading `what` when GDSL_DEBUG >= level; `text` may be a function giving
    it, so that a large text (a program's IR, its plan) is only made when it is printed."""
    if debug_level() >= level:
        print(f"[gdsl {what}]\n{text() if callable(text) else text}", file=sys.stderr)

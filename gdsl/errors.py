"""The exceptions gdsl raises. Each names what the user can do about it."""

from __future__ import annotations


class ConcretizationError(TypeError):
    """Python control flow (`if`, `while`, `bool()`, `int()`, `float()`) met a traced value."""


class RecursionDepthError(RuntimeError):
    """A `gdsl.recurse` function went deeper than its `max_depth` at run time."""

    @classmethod
    def of(cls, fn) -> RecursionDepthError:
        """The error for recursive function `fn` (anything with `name` and `max_depth`)."""
        return cls(f"recursive function {fn.name!r} went deeper than max_depth={fn.max_depth}; "
                   f"raise max_depth in @gdsl.recurse(...) if the data needs it")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine (the message says what is missing)."""


class CompileError(RuntimeError):
    """A backend compiler rejected generated source.

    `log` is the compiler's log; `source` the whole generated source; `line` the offending source line
    (or None when the log names none).
    """

    def __init__(self, message: str, log: str = "", source: str = "", line: str | None = None):
        super().__init__(message)
        self.log = log
        self.source = source
        self.line = line

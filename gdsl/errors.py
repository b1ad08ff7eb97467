"""The exceptions gdsl raises. Each names what the user can do about it."""


class ConcretizationError(TypeError):
    """Python control flow (`if`, `while`, `bool()`, `int()`, `float()`) met a traced value."""


class RecursionDepthError(RuntimeError):
    """A `gdsl.recurse` function went deeper than its `max_depth` at run time."""


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

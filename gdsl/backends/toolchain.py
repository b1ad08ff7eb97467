"""What the CUDA and HIP toolchains share: a disk cache of binaries and the CompileError they raise.

The cache lives in `$GDSL_CACHE_DIR` (default `~/.cache/gdsl`), one subfolder per backend (`cuda/`, `hip/`).
A binary's file name is the sha256 of everything that decides its bytes, so a stale entry is never found:

    key = sha256(repr(key_parts)); path = cache_dir() / kind / f"{key}{suffix}"
    binary = path.read_bytes() if path.exists() else write(path, compile())
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from gdsl.errors import CompileError


def cache_dir() -> Path:
    """The root of gdsl's disk cache, read at each call so tests can point it elsewhere."""
    return Path(os.environ.get("GDSL_CACHE_DIR") or Path.home() / ".cache" / "gdsl")


def cached_compile(kind: str, key_parts: tuple, compile: Callable[[], bytes], suffix: str = ".bin") -> bytes:
    """Return compile()'s bytes, from `cache_dir()/kind/` when the same key_parts were compiled before.

    key_parts must name everything the bytes depend on (source, arch, options, compiler version).
    An unreadable or unwritable cache only costs a recompile; it never fails the call.
    """
    key = hashlib.sha256(repr(key_parts).encode()).hexdigest()
    path = cache_dir() / kind / f"{key}{suffix}"
    try:
        return path.read_bytes()
    except OSError:
        pass
    binary = compile()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write a temporary file in the same folder, then rename: a reader in another process (pytest -n)
        # sees either no file or the whole file, never a half-written one.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(binary)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass
    return binary


def compile_error(tool: str, log: str, source: str, line_pattern: str) -> CompileError:
    """A CompileError quoting the compiler log and the first source line the log blames.

    line_pattern is a regex whose group 1 is a 1-based line number of `source` in an error line of the log
    (NVRTC writes `gdsl.cu(12): error: ...`, clang and hiprtc `gdsl.hip:12:5: error: ...`).
    """
    lines = source.splitlines()
    match = re.search(line_pattern, log)
    number = int(match.group(1)) if match else 0
    if 1 <= number <= len(lines):
        line = lines[number - 1]
        message = f"{tool} rejected the generated source at line {number}:\n  {number:4d} | {line}\n{log}"
    else:
        line = None
        message = f"{tool} rejected the generated source:\n{log}"
    return CompileError(message.rstrip(), log=log, source=source, line=line)

"""What the CUDA and HIP toolchains (and the autotuner) share: gdsl's disk cache, the CompileError they raise,
and the progress line of a slow step.

The cache lives in `$GDSL_CACHE_DIR` (default `~/.cache/gdsl`), one subfolder per backend (`cuda/`, `hip/`).
A binary's file name is the sha256 of everything that decides its bytes, so a stale entry is never found:

    key = sha256(repr(key_parts)); path = cache_dir() / kind / f"{key}{suffix}"
    binary = read(path) if it checks out else write(path, compile())

Each entry is a header (magic, payload length, sha256 of the payload) followed by the payload. An entry that is
truncated, empty, from an older format or otherwise does not check out is recompiled and replaced: a damaged
cache costs a compile, never a wrong binary. Entries are written to a temporary file and renamed into place, so
a reader in another process sees the old entry or the new one, never half of one.

Trust: binaries are loaded from the cache by key alone, so whoever can write the cache directory can run code
in gdsl's process. Like ssh (StrictModes) and pip, gdsl therefore does not use a cache directory that another
user could write to: one not owned by the current user, or with the group or other write bit set. Such a
directory is *ignored with a CacheWarning* (gdsl runs without a disk cache, it does not fail), and the warning
says how to fix it (`chmod go-w DIR`, or point GDSL_CACHE_DIR elsewhere). Directories gdsl creates itself are
made with mode 0o700.

A compile that takes longer than SLOW_AFTER_S seconds says what it is doing on stderr: a status line with the
elapsed time that updates in place when stderr is a terminal, else INFO records on the `gdsl` logger.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import struct
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from gdsl.debug import debug
from gdsl.errors import CompileError

logger = logging.getLogger("gdsl")

SLOW_AFTER_S = 2.0      # a step that runs longer than this shows a progress line (or a log record)
_TICK_S = 1.0           # how often a terminal's progress line is redrawn
_LOG_EVERY_S = 10.0     # how often a log record repeats while the step runs on

_MAGIC = b"gdsl-cache-1\n"
_HEADER = struct.Struct("<Q32s")   # payload length, sha256(payload)


class CacheWarning(UserWarning):
    """gdsl's disk cache (or an entry of it) cannot be used; gdsl carries on without it."""


# ---- the cache directory, checked before use ----

def cache_dir() -> Path:
    """The root of gdsl's disk cache, read at each call so tests can point it elsewhere (not yet checked)."""
    return Path(os.environ.get("GDSL_CACHE_DIR") or Path.home() / ".cache" / "gdsl")


def _untrusted_reason(path: Path) -> str | None:
    """Why `path` (an existing directory) must not be trusted, or None when only its owner can write it."""
    info = path.stat()
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return f"is owned by uid {info.st_uid}, not by the current user (uid {os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by other users (mode {stat.S_IMODE(info.st_mode):o}); fix it with: chmod go-w {path}"
    return None


def trusted_dir(*parts: str) -> Path | None:
    """`cache_dir()/parts...`, created (mode 0o700) if missing, or None with a CacheWarning when it cannot be
    created or another user could write to it (see the module docstring). Callers run without a cache on None."""
    root = cache_dir()
    folders = [root]
    for part in parts:
        folders.append(folders[-1] / part)
    try:
        for folder in folders:
            if not folder.exists():
                os.makedirs(folder, mode=0o700, exist_ok=True)
            reason = _untrusted_reason(folder)
            if reason:
                warnings.warn(f"gdsl does not use the cache directory {folder}: it {reason}. Running without "
                              f"a disk cache (set GDSL_CACHE_DIR to a directory only you can write).",
                              CacheWarning, stacklevel=3)
                return None
    except OSError as e:
        warnings.warn(f"gdsl cannot use the cache directory {root} ({type(e).__name__}: {e}); running without "
                      f"a disk cache", CacheWarning, stacklevel=3)
        return None
    return folders[-1]


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename, so another process
    sees the old file or the new one, never a half-written one. Raises OSError."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ---- cache entries: header + payload ----

def _pack(payload: bytes) -> bytes:
    return _MAGIC + _HEADER.pack(len(payload), hashlib.sha256(payload).digest()) + payload


def _unpack(entry: bytes) -> bytes | None:
    """The payload of a well-formed entry, or None when anything about it is off."""
    start = len(_MAGIC) + _HEADER.size
    if len(entry) < start or not entry.startswith(_MAGIC):
        return None
    length, digest = _HEADER.unpack_from(entry, len(_MAGIC))
    payload = entry[start:]
    if len(payload) != length or hashlib.sha256(payload).digest() != digest:
        return None
    return payload


def _read_entry(path: Path) -> bytes | None:
    try:
        entry = path.read_bytes()
    except OSError:
        return None   # not there (the usual miss) or unreadable: compile
    payload = _unpack(entry)
    if payload is None:
        debug(1, "cache", f"{path}: damaged entry ({len(entry)} bytes), recompiling")
    return payload


def cached_compile(kind: str, key_parts: tuple, compile: Callable[[], bytes], suffix: str = ".bin",
                   what: str | None = None) -> bytes:
    """Return compile()'s bytes, from `cache_dir()/kind/` when the same key_parts were compiled before.

    key_parts must name everything the bytes depend on (source, arch, options, compiler version). `what` names
    the compiler for the progress line of a slow compile ("NVRTC", "hiprtc", ...). An entry that does not check
    out is recompiled and replaced; an unusable cache only costs a recompile; neither fails the call.
    """
    key = hashlib.sha256(repr(key_parts).encode()).hexdigest()
    folder = trusted_dir(kind)
    path = folder / f"{key}{suffix}" if folder else None
    if path is not None:
        cached = _read_entry(path)
        if cached is not None:
            return cached
    t0 = time.perf_counter()
    with Progress(f"compiling with {what or kind}"):
        binary = compile()
    debug(4, "timing", f"{what or kind} compile: {1e3 * (time.perf_counter() - t0):.1f} ms")
    if path is not None:
        try:
            write_atomically(path, _pack(binary))
        except OSError as e:
            debug(1, "cache", f"could not write {path}: {e}")
    return binary


# ---- progress of a slow step ----

_active = threading.local()   # the Progress running in this thread, so a nested one reports through it


class Progress:
    """`with Progress("compiling with NVRTC"):` — silent while the step is quick; after SLOW_AFTER_S seconds
    it shows what is running and for how long: a status line redrawn in place on a terminal, else INFO records
    on the `gdsl` logger. `update(detail)` says how far it is ("candidate 3/7"). A Progress started inside
    another one in the same thread shows as the outer one's detail instead of a second line."""

    def __init__(self, what: str, stream=None):
        self.what = what
        self.detail = ""
        self.stream = stream
        self._outer = None
        self._stop = threading.Event()
        self._thread = None
        self._shown = False
        self._start = 0.0

    def update(self, detail: str) -> None:
        self.detail = detail

    def __enter__(self):
        self._start = time.monotonic()
        self._outer = getattr(_active, "progress", None)
        if self._outer is not None:
            self._outer_detail = self._outer.detail
            self._outer.update(f"{self._outer_detail}: {self.what}" if self._outer_detail else self.what)
            return self
        _active.progress = self
        if self.stream is None:
            self.stream = sys.stderr
        self._thread = threading.Thread(target=self._watch, name="gdsl-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, traceback):
        if self._outer is not None:
            self._outer.update(self._outer_detail)
            return
        _active.progress = None
        self._stop.set()
        self._thread.join()
        if self._shown:
            ending = "done in" if exc_type is None else f"{exc_type.__name__} after"
            self._say(f"{self.what}: {ending} {self._elapsed():.1f} s", final=True)

    def _elapsed(self) -> float:
        return time.monotonic() - self._start

    def _line(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.what}{detail}: {self._elapsed():.0f} s"

    def _is_terminal(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def _say(self, text: str, final: bool = False) -> None:
        if self._is_terminal():
            # \r and erase-to-end-of-line redraw the one status line; the last message ends it.
            self.stream.write(f"\r[gdsl] {text}\x1b[K" + ("\n" if final else ""))
            self.stream.flush()
        else:
            logger.info("%s", text)

    def _watch(self) -> None:
        if self._stop.wait(SLOW_AFTER_S):
            return
        self._shown = True
        interval = _TICK_S if self._is_terminal() else _LOG_EVERY_S
        self._say(self._line())
        while not self._stop.wait(interval):
            self._say(self._line())


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

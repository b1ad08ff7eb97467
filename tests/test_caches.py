"""gdsl's disk caches: damaged entries are recompiled, an untrusted directory is not used, the emulator loads
its libraries from a private directory, and a slow compile says what it is doing (issue 14 items 14-16,
issue 12)."""
import io
import logging
import os
import re
import shutil
import stat
import time
import warnings

import pytest

from gdsl.backends import toolchain
from gdsl.backends.toolchain import CacheWarning, Progress, cached_compile


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GDSL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


class CountingCompiler:
    """A fake compile: returns `binary` and counts its calls."""

    def __init__(self, binary: bytes):
        self.binary = binary
        self.calls = 0

    def __call__(self) -> bytes:
        self.calls += 1
        return self.binary


def _only_entry(cache_root):
    (entry,) = (cache_root / "test").glob("*.bin")
    return entry


# ---- item 14: a damaged entry is recompiled and replaced ----

@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage", "flipped byte", "old format"])
def test_damaged_entry_is_recompiled_and_replaced(private_cache, damage):
    binary = b"\x7fELF" + bytes(range(256)) * 8
    compiler = CountingCompiler(binary)
    assert cached_compile("test", ("k",), compiler) == binary
    assert cached_compile("test", ("k",), compiler) == binary
    assert compiler.calls == 1      # the second call was a hit
    entry = _only_entry(private_cache)
    good = entry.read_bytes()
    damaged = {"truncate": good[:len(good) // 2], "empty": b"", "garbage": os.urandom(len(good)),
               "flipped byte": good[:-1] + bytes([good[-1] ^ 1]), "old format": binary}[damage]
    entry.write_bytes(damaged)
    assert cached_compile("test", ("k",), compiler) == binary
    assert compiler.calls == 2      # recompiled
    assert entry.read_bytes() == good   # and the entry replaced: the next call is a hit again
    assert cached_compile("test", ("k",), compiler) == binary
    assert compiler.calls == 2


def test_empty_binary_round_trips(private_cache):
    compiler = CountingCompiler(b"")
    assert cached_compile("test", ("empty",), compiler) == b""
    assert cached_compile("test", ("empty",), compiler) == b""
    assert compiler.calls == 1


# ---- item 16: a cache directory other users can write is not used ----

@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_cache_writable_by_others_is_ignored_with_a_warning(private_cache, mode):
    private_cache.mkdir()
    os.chmod(private_cache, mode)
    compiler = CountingCompiler(b"binary")
    with pytest.warns(CacheWarning, match="writable by other users.*chmod go-w"):
        assert cached_compile("test", ("k",), compiler) == b"binary"
    with pytest.warns(CacheWarning):
        assert cached_compile("test", ("k",), compiler) == b"binary"
    assert compiler.calls == 2                 # nothing read from the directory...
    assert list(private_cache.iterdir()) == []  # ...and nothing written to it


def test_cache_subfolder_writable_by_others_is_ignored(private_cache):
    (private_cache / "test").mkdir(parents=True)
    os.chmod(private_cache / "test", 0o777)
    with pytest.warns(CacheWarning, match="writable by other users"):
        cached_compile("test", ("k",), CountingCompiler(b"x"))
    assert list((private_cache / "test").iterdir()) == []


def test_cache_owned_by_another_user_is_ignored(private_cache, monkeypatch):
    private_cache.mkdir(mode=0o700)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(private_cache).st_uid + 1)
    with pytest.warns(CacheWarning, match="not by the current user"):
        cached_compile("test", ("k",), CountingCompiler(b"x"))
    assert list(private_cache.iterdir()) == []


def test_cache_directories_are_created_private(private_cache):
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a fresh cache is trusted: no warning
        cached_compile("test", ("k",), CountingCompiler(b"x"))
    for folder in (private_cache, private_cache / "test"):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700


def test_unusable_cache_dir_only_costs_a_compile(private_cache, monkeypatch):
    private_cache.parent.joinpath("a-file").write_text("not a directory")
    monkeypatch.setenv("GDSL_CACHE_DIR", str(private_cache.parent / "a-file" / "cache"))
    with pytest.warns(CacheWarning, match="cannot use the cache directory"):
        assert cached_compile("test", ("k",), CountingCompiler(b"x")) == b"x"


@pytest.mark.skipif(shutil.which("g++") is None, reason="the emulator needs g++")
def test_emulator_loads_from_a_private_directory():
    import tempfile

    from gdsl.backends.cfamily import emulator
    source = 'extern "C" int gdsl_answer() { return 42; }\n'
    path = emulator.compile_emulated(source)
    folder = os.path.dirname(path)
    assert folder != tempfile.gettempdir()
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700 and os.stat(folder).st_uid == os.getuid()
    assert emulator._load(path).gdsl_answer() == 42
    # the next process gets its own directory; this one's is removed at exit
    assert folder == emulator._private_dir()


# ---- issue 12: a slow compile is not silent ----

def slow_compile(seconds: float, binary: bytes = b"slow"):
    def compile():
        time.sleep(seconds)
        return binary
    return compile


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_slow_compile_shows_a_progress_line_on_a_terminal(monkeypatch):
    monkeypatch.setattr(toolchain, "SLOW_AFTER_S", 0.1)
    monkeypatch.setattr(toolchain, "_TICK_S", 0.1)
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert cached_compile("test", ("slow",), slow_compile(0.5), what="NVRTC") == b"slow"
    text = terminal.getvalue()
    assert text.startswith("\r[gdsl] compiling with NVRTC: 0 s")
    assert text.count("\r") >= 3                  # redrawn in place while it runs
    assert re.search(r"\r\[gdsl\] compiling with NVRTC: done in 0\.[5-9] s\x1b\[K\n$", text)


def test_slow_compile_logs_when_stderr_is_not_a_terminal(monkeypatch, caplog):
    monkeypatch.setattr(toolchain, "SLOW_AFTER_S", 0.1)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with caplog.at_level(logging.INFO, logger="gdsl"):
        cached_compile("test", ("slow",), slow_compile(0.3), what="hiprtc (gfx90a)")
    messages = [r.getMessage() for r in caplog.records if r.name == "gdsl"]
    assert messages[0] == "compiling with hiprtc (gfx90a): 0 s"
    assert messages[-1].startswith("compiling with hiprtc (gfx90a): done in 0.")


def test_quick_compile_is_silent(monkeypatch, caplog):
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with caplog.at_level(logging.INFO, logger="gdsl"):
        cached_compile("test", ("quick",), slow_compile(0.0))
    assert terminal.getvalue() == "" and not caplog.records


def test_compile_timing_at_debug_level_4(monkeypatch, capsys):
    monkeypatch.setenv("GDSL_DEBUG", "4")
    cached_compile("test", ("timed",), slow_compile(0.0), what="NVRTC")
    assert "NVRTC compile:" in capsys.readouterr().err


def test_nested_progress_shows_as_the_outer_line_detail(monkeypatch):
    monkeypatch.setattr(toolchain, "SLOW_AFTER_S", 0.05)
    monkeypatch.setattr(toolchain, "_TICK_S", 0.05)
    terminal = FakeTerminal()
    with Progress("autotune", stream=terminal) as outer:
        outer.update("candidate 1/2")
        with Progress("compiling with NVRTC", stream=terminal):
            time.sleep(0.2)
        assert outer.detail == "candidate 1/2"
    text = terminal.getvalue()
    assert "autotune (candidate 1/2: compiling with NVRTC): 0 s" in text
    assert re.search(r"autotune: done in 0\.[2-9] s\x1b\[K\n$", text)

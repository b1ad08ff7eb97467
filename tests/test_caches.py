"""gdsl's disk caches: damaged entries are recompiled, an untrusted directory is not used, the emulator loads
its libraries from a private directory, and a slow compile says what it is doing (issue 14 items 14-16,
issue 12)."""
import io
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
import warnings

import numpy as np
import pytest
from strategies import requires_backend

import gdsl
import gdsl.backends.cpu
import gdsl.numpy as gnp
from gdsl import autotune
from gdsl.backends import toolchain
from gdsl.backends.toolchain import CacheWarning, Progress, cached_compile
from gdsl.interpreter import run_program


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


# ---- the autotuner: its cache (item 15) and its choice (issue 12) ----

def _tanh_loop(x, n):
    return gdsl.fori_loop(0, n, lambda i, x: gnp.tanh(x @ x), x)


def _tanh_loop_input():
    return (np.random.default_rng(0).standard_normal((8, 8)) * 0.3).astype(np.float32)


def _check_cpu_autotune():
    """autotune=True on cpu gives the interpreter's answer; returns the tuned jit object."""
    x = _tanh_loop_input()
    tuned = gdsl.jit(_tanh_loop, backend="cpu", autotune=True)
    np.testing.assert_allclose(gdsl.to_numpy(tuned(x, 3)), gdsl.jit(_tanh_loop, backend="interpret")(x, 3),
                               rtol=1e-5, atol=1e-6)
    return tuned


@requires_backend("cpu")
def test_autotune_with_an_unusable_cache_dir_runs_without_cache(private_cache, monkeypatch):
    private_cache.parent.joinpath("a-file").write_text("not a directory")
    monkeypatch.setenv("GDSL_CACHE_DIR", str(private_cache.parent / "a-file" / "cache"))
    with pytest.warns(CacheWarning, match="cannot use the cache directory"):
        _check_cpu_autotune()


@requires_backend("cpu")
def test_autotune_with_an_untrusted_cache_dir_runs_without_cache(private_cache):
    private_cache.mkdir()
    os.chmod(private_cache, 0o777)
    with pytest.warns(CacheWarning, match="writable by other users"):
        _check_cpu_autotune()
    assert not (private_cache / autotune.CACHE_FILE).exists()


@requires_backend("cpu")
@pytest.mark.parametrize("content", ["[]", "null", "3", '"text"', "{not json", ""])
def test_autotune_cache_of_the_wrong_shape_is_ignored_and_rewritten(private_cache, content):
    private_cache.mkdir(mode=0o700)
    (private_cache / autotune.CACHE_FILE).write_text(content)
    with pytest.warns(CacheWarning, match="autotune cache .* ignored"):
        _check_cpu_autotune()
    (winner,) = json.loads((private_cache / autotune.CACHE_FILE).read_text()).values()
    assert winner["control"] in ("device", "host")


@requires_backend("cpu")
@pytest.mark.parametrize("bad", [{"control": "device", "grid": 0}, {"control": "sideways"}, [], "device"])
def test_invalid_cached_options_are_ignored(private_cache, bad):
    _check_cpu_autotune()
    path = private_cache / autotune.CACHE_FILE
    (key,) = json.loads(path.read_text())
    path.write_text(json.dumps({key: bad}))
    with pytest.warns(CacheWarning, match="not one of the candidates"):
        _check_cpu_autotune()
    assert json.loads(path.read_text())[key] in autotune.candidates(gdsl.backends.cpu, None, {"autotune": True})


def test_concurrent_tuners_keep_each_others_entries(private_cache, monkeypatch):
    # Every reader waits after reading, so unlocked read-modify-write cycles would all overlap.
    real_load = json.load

    def slow_load(f):
        value = real_load(f)
        time.sleep(0.05)
        return value
    monkeypatch.setattr(json, "load", slow_load)
    keys = [f"key-{i}" for i in range(8)]
    threads = [threading.Thread(target=autotune._store, args=(k, {"control": "device", "grid": i}))
               for i, k in enumerate(keys)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache = json.loads((private_cache / autotune.CACHE_FILE).read_text())
    assert cache == {k: {"control": "device", "grid": i} for i, k in enumerate(keys)}


class FakeBackend:
    """A backend whose candidates compute the right answer (the interpreter's) and whose calls take the
    time `speed[grid]` with relative noise `noise`, on a fake clock that autotune.timer hands out."""

    def __init__(self, speed: dict, noise: float, device: str = "fake device"):
        self.speed, self.noise, self.device = speed, noise, device
        self.rng = np.random.default_rng(0)
        self.lowered = []

    def autotune_candidates(self, program, options):
        return [{"control": "device", "grid": g} for g in self.speed if g is not None]

    def device_name(self):
        return self.device

    def lower(self, program, options):
        self.lowered.append(options)
        return program, options

    def load(self, lowering):
        program, options = lowering

        def executable(flat_args):
            return run_program(program, [np.asarray(a) for a in flat_args])
        executable.seconds = lambda: self.speed[options.get("grid")] * (1 + self.noise * self.rng.standard_normal())
        return executable


def _tune(backend, x=None):
    x = _tanh_loop_input() if x is None else x
    program = gdsl.make_ir(_tanh_loop)(x, 3)
    return autotune.autotune(backend, "fake", program, {"autotune": True}, [x, np.int32(3)])


@pytest.fixture
def fake_clock(monkeypatch):
    monkeypatch.setattr(autotune, "timer", lambda executable, flat_args, outputs: executable.seconds)


@pytest.mark.parametrize("speed", [
    {None: 1.0, 8: 1.0, 16: 1.0, 32: 1.0},        # a tie
    {None: 1.0, 8: 0.995, 16: 0.997, 32: 1.0},    # challengers 0.3-0.5 % faster: within the noise
    {None: 1.0, 8: 1.02, 16: 1.05, 32: 1.3},      # challengers slower
])
def test_default_wins_ties_and_noise(fake_clock, speed):
    *_, chosen = _tune(FakeBackend(speed, noise=0.05))
    assert chosen == {"control": "device"}


def test_a_clearly_faster_candidate_wins(fake_clock):
    *_, chosen = _tune(FakeBackend({None: 1.0, 8: 1.0, 16: 0.9, 32: 0.97}, noise=0.05))
    assert chosen == {"control": "device", "grid": 16}


def test_a_wrong_candidate_is_never_chosen(fake_clock):
    backend = FakeBackend({None: 1.0, 8: 0.5}, noise=0.01)
    load = backend.load

    def load_wrong_grid_8(lowering):
        executable = load(lowering)
        if lowering[1].get("grid") != 8:
            return executable
        def off_by_one(flat_args):
            return [o + 1 for o in executable(flat_args)]
        off_by_one.seconds = executable.seconds
        return off_by_one
    backend.load = load_wrong_grid_8
    *_, chosen = _tune(backend)
    assert chosen == {"control": "device"}


def test_measure_runs_until_the_median_is_precise():
    steady = autotune.measure(lambda: 1.0)
    assert steady.runs == autotune.MIN_RUNS and steady.median == 1.0
    rng = np.random.default_rng(1)
    noisy = autotune.measure(lambda: 1.0 + 0.05 * rng.standard_normal())
    assert noisy.runs > autotune.MIN_RUNS
    assert noisy.high - noisy.low <= 2 * autotune.TARGET_REL_CI * noisy.median
    assert noisy.low <= 1.0 <= noisy.high


def test_cached_winner_is_reused_per_device(fake_clock, monkeypatch, private_cache):
    *_, chosen = _tune(FakeBackend({None: 1.0, 8: 0.5}, noise=0.01))
    assert chosen == {"control": "device", "grid": 8}
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: pytest.fail("searched again"))
    again = FakeBackend({None: 1.0, 8: 0.5}, noise=0.01)
    *_, reused = _tune(again)
    assert reused == chosen and again.lowered == [chosen]
    # the key names the device: another device searches again
    monkeypatch.undo()
    monkeypatch.setenv("GDSL_CACHE_DIR", str(private_cache))
    monkeypatch.setattr(autotune, "timer", lambda executable, flat_args, outputs: executable.seconds)
    other = FakeBackend({None: 1.0, 8: 2.0}, noise=0.01, device="another device")
    *_, chosen_there = _tune(other)
    assert chosen_there == {"control": "device"} and len(other.lowered) == 2
    assert len(json.loads((private_cache / autotune.CACHE_FILE).read_text())) == 2


def test_autotune_shows_progress(fake_clock, monkeypatch, caplog):
    monkeypatch.setattr(toolchain, "SLOW_AFTER_S", 0.0)
    monkeypatch.setattr(toolchain, "_LOG_EVERY_S", 0.01)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    backend = FakeBackend({None: 1.0, 8: 1.0}, noise=0.0)
    seconds_of = backend.load

    def slow_load(lowering):
        time.sleep(0.1)
        return seconds_of(lowering)
    backend.load = slow_load
    with caplog.at_level(logging.INFO, logger="gdsl"):
        _tune(backend)
    messages = [r.getMessage() for r in caplog.records if r.name == "gdsl"]
    assert any("autotune on fake (candidate 2/2: {'control': 'device', 'grid': 8})" in m for m in messages)
    assert messages[-1].startswith("autotune on fake: done in")


def test_a_slow_compile_that_fails_says_so(monkeypatch):
    monkeypatch.setattr(toolchain, "SLOW_AFTER_S", 0.05)
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)

    def failing():
        time.sleep(0.2)
        raise toolchain.CompileError("rejected")
    with pytest.raises(toolchain.CompileError):
        cached_compile("test", ("fails",), failing, what="NVRTC")
    assert re.search(r"compiling with NVRTC: CompileError after 0\.[2-9] s\x1b\[K\n$", terminal.getvalue())


def test_a_machine_that_speeds_up_does_not_crown_an_equal_candidate(fake_clock):
    """Every candidate equally fast, but the machine speeds up over its first calls (clocks ramping, host caches
    warming): the default, timed first, measures slower, and a later candidate looks clearly faster in the
    search. Timed again alternately with the default it is not, so the default stays."""
    backend = FakeBackend({None: 1.0, 8: 1.0, 16: 1.0}, noise=0.01)
    load, calls = backend.load, []

    def load_ramping(lowering):
        executable = load(lowering)
        steady = executable.seconds
        executable.seconds = lambda: calls.append(1) or steady() * (1.3 if len(calls) < 40 else 1.0)
        return executable
    backend.load = load_ramping
    *_, chosen = _tune(backend)
    assert chosen == {"control": "device"}


def test_a_clearly_faster_candidate_survives_the_confirmation(fake_clock, monkeypatch):
    """A winner 10 % faster than the default wins each of the alternating re-timings too."""
    rounds = []
    confirmed = autotune._confirmed
    monkeypatch.setattr(autotune, "_confirmed", lambda *a: rounds.append(a) or confirmed(*a))
    *_, chosen = _tune(FakeBackend({None: 1.0, 8: 1.0, 16: 0.9}, noise=0.02))
    assert chosen == {"control": "device", "grid": 16} and len(rounds) == 1

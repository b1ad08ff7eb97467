"""Ctrl-C for kernels that loop.

While a device-control kernel with loops runs on the main thread, a native SIGINT handler
(_INTERRUPT_IR) replaces Python's: it sets the executable's interrupt word, every loop back-edge and
barrier wait sees it and returns, and the call raises KeyboardInterrupt; Python's handler is restored after.
"""
from __future__ import annotations

import ctypes
import signal
import sys
import threading

from gdsl.backends.cpu.compiler import compile_module

# The native SIGINT handler: the Python-level handler cannot run while the main thread is in a kernel (ctypes
# holds it in native code until the kernel returns). It sets the interrupt word (i32 3) of the barrier block
# that @gdsl_interrupt_target points at, adds 2 to the barrier's sense word (so no barrier wait can complete
# and a thread about to sleep on it does not) and wakes its sleepers (futex is async-signal-safe).
_INTERRUPT_IR = r"""
@gdsl_interrupt_target = global ptr null, align 8

define void @gdsl_on_sigint(i32 %signal) nounwind {
entry:
  %bar = load atomic ptr, ptr @gdsl_interrupt_target seq_cst, align 8
  %none = icmp eq ptr %bar, null
  br i1 %none, label %out, label %stop
stop:
  %word = getelementptr inbounds i32, ptr %bar, i64 3
  store atomic volatile i32 1, ptr %word seq_cst, align 4
  %sense = getelementptr inbounds i32, ptr %bar, i64 1
  %old = atomicrmw add ptr %sense, i32 2 seq_cst, align 4
  %w = call i64 (i64, ...) @syscall(i64 202, ptr %sense, i32 129, i32 2147483647, ptr null, ptr null, i32 0)
  br label %out
out:
  ret void
}

declare i64 @syscall(i64, ...)
"""


class _SigAction(ctypes.Structure):
    """glibc's struct sigaction on Linux (x86-64, aarch64)."""
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16), ("flags", ctypes.c_int),
                ("restorer", ctypes.c_void_p)]


class Interrupts:
    """Ctrl-C for kernels that loop: `run(barrier, call)` calls call() with the native SIGINT handler in
    place of Python's (main thread only, and only while Python's own handler is the default one that raises
    KeyboardInterrupt); raises KeyboardInterrupt if SIGINT came during the call."""
    def __init__(self):
        self.module = None

    def _setup(self) -> None:
        if self.module is None:
            self.module = compile_module(_INTERRUPT_IR, ["gdsl_on_sigint"])
            self.target = ctypes.c_void_p.from_address(self.module.global_address("gdsl_interrupt_target"))
            self.action = _SigAction(self.module["gdsl_on_sigint"])
            self.libc = ctypes.CDLL(None, use_errno=True)

    def run(self, barrier, call):
        if (not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            return call()
        self._setup()
        barrier[3] = 0
        previous = _SigAction()
        self.target.value = barrier.ctypes.data
        if self.libc.sigaction(signal.SIGINT, ctypes.byref(self.action), ctypes.byref(previous)) != 0:
            self.target.value = None
            return call()
        try:
            # A SIGINT that came between Python's last check and the sigaction above went to Python's handler,
            # which only runs at Python's next check: after the kernel, never for a loop that does not end.
            # Run it now (KeyboardInterrupt, Python's own handler being the default one).
            ctypes.pythonapi.PyErr_CheckSignals()
            result = call()
        finally:
            self.libc.sigaction(signal.SIGINT, ctypes.byref(previous), None)
            self.target.value = None
        if barrier[3]:
            raise KeyboardInterrupt
        return result


ctrl_c = Interrupts()

"""Compile one HIP source with hiprtc (ROCm 5.2's libamdhip64.so.5) through ctypes, in its own process.

Run by gdsl.backends.hip.toolchain as `python _hiprtc_worker.py LIBRARY ARCH OUT_PATH [OPTION ...]`, source on
stdin; LIBRARY is the shared library holding hiprtc (libhiprtc.so.7 on ROCm 7, libamdhip64.so.5 on ROCm 5.2).
It is a subprocess because hiprtc 5.2 aborts the whole process for some archs (gfx940/942, gfx1100/1101).
It imports nothing from gdsl, so it runs by file path whatever sys.path holds.

Exit status: 0 = code object written to OUT_PATH; 1 = compile error, hiprtc's log on stdout;
2 = hiprtc could not be loaded or failed otherwise, the reason on stdout; killed by a signal = hiprtc crashed.
"""
import ctypes
import sys

HIPRTC_ERROR_COMPILATION = 6


def compile_hip(library: str, source: bytes, arch: str, options: list[str]) -> tuple[int, bytes]:
    lib = ctypes.CDLL(library)
    lib.hiprtcGetErrorString.restype = ctypes.c_char_p
    prog = ctypes.c_void_p()
    status = lib.hiprtcCreateProgram(ctypes.byref(prog), source, b"gdsl.hip", 0, None, None)
    if status:
        return 2, b"hiprtcCreateProgram: " + lib.hiprtcGetErrorString(status)
    try:
        opts = [f"--offload-arch={arch}".encode(), *(o.encode() for o in options)]
        status = lib.hiprtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if status:
            size = ctypes.c_size_t()
            lib.hiprtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value + 1)
            lib.hiprtcGetProgramLog(prog, log)
            code = 1 if status == HIPRTC_ERROR_COMPILATION else 2
            return code, lib.hiprtcGetErrorString(status) + b"\n" + log.value
        size = ctypes.c_size_t()
        lib.hiprtcGetCodeSize(prog, ctypes.byref(size))
        binary = ctypes.create_string_buffer(size.value)
        lib.hiprtcGetCode(prog, binary)
        return 0, binary.raw
    finally:
        lib.hiprtcDestroyProgram(ctypes.byref(prog))


def main() -> int:
    library, arch, out_path, *options = sys.argv[1:]
    try:
        status, payload = compile_hip(library, sys.stdin.buffer.read(), arch, options)
    except OSError as e:  # the library is missing
        status, payload = 2, str(e).encode()
    if status == 0:
        with open(out_path, "wb") as f:
            f.write(payload)
    else:
        sys.stdout.buffer.write(payload)
    return status


if __name__ == "__main__":
    sys.exit(main())

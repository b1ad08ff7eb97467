"""Convolution and pooling primitives (NCHW activations, OIHW weights)."""
from __future__ import annotations

import numpy as np

from gdsl.core.ir import ShapedArray
from gdsl.primitives.registry import CONVOLUTION, WINDOW, primitive

conv2d_p = primitive("conv2d", CONVOLUTION)
avg_pool2d_p = primitive("avg_pool2d", WINDOW)
max_pool2d_p = primitive("max_pool2d", WINDOW)


def _out_size(n, k, stride, pad):
    return (n + 2 * pad - k) // stride + 1


@conv2d_p.def_abstract_eval
def _conv2d(x, w, *, stride, padding):
    if x.ndim != 4 or w.ndim != 4:
        raise TypeError(f"conv2d needs x[N,C,H,W] and w[O,C,KH,KW], got {x} and {w}")
    if x.shape[1] != w.shape[1] or x.dtype != w.dtype:
        raise TypeError(f"conv2d channels or dtypes differ: {x} and {w}")
    ho, wo = (_out_size(x.shape[2], w.shape[2], stride, padding),
              _out_size(x.shape[3], w.shape[3], stride, padding))
    if ho <= 0 or wo <= 0:
        raise TypeError(f"conv2d window larger than the padded input: {x}, {w}")
    return [ShapedArray((x.shape[0], w.shape[0], ho, wo), x.dtype)]


def _windows(x, kh, kw, stride, padding, pad_value):
    """x[N,C,H,W] -> windows[N,C,HO,WO,KH,KW]."""
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), constant_values=pad_value)
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))
    return win[:, :, ::stride, ::stride]


@conv2d_p.def_impl
def _conv2d_impl(x, w, *, stride, padding):
    win = _windows(x.astype(np.float32), w.shape[2], w.shape[3], stride, padding, 0)
    out = np.einsum("nchwij,ocij->nohw", win, w.astype(np.float32), optimize=True)
    return [out.astype(x.dtype)]


def _pool_abstract(x, *, window, stride, padding):
    if x.ndim != 4:
        raise TypeError(f"pooling needs x[N,C,H,W], got {x}")
    ho, wo = (_out_size(x.shape[2], window, stride, padding), _out_size(x.shape[3], window, stride, padding))
    if ho <= 0 or wo <= 0:
        raise TypeError(f"pooling window larger than the padded input: {x}")
    return [ShapedArray((x.shape[0], x.shape[1], ho, wo), x.dtype)]


avg_pool2d_p.def_abstract_eval(_pool_abstract)
max_pool2d_p.def_abstract_eval(_pool_abstract)


@avg_pool2d_p.def_impl
def _avg_pool_impl(x, *, window, stride, padding):
    # Padding counts toward the divisor (PyTorch's count_include_pad=True).
    win = _windows(x.astype(np.float32), window, window, stride, padding, 0)
    return [win.mean(axis=(-2, -1)).astype(x.dtype)]


@max_pool2d_p.def_impl
def _max_pool_impl(x, *, window, stride, padding):
    win = _windows(x, window, window, stride, padding, -np.inf)
    return [win.max(axis=(-2, -1)).astype(x.dtype)]

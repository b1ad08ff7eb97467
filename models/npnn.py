"""Plain numpy building blocks of the reference implementations (float64, NCHW / OIHW, no gdsl).

Kept deliberately simple: each function is what the textbook formula says; tests check the convolution
and pools against PyTorch when it is installed.
"""
from __future__ import annotations

import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def relu(x):
    return np.maximum(x, 0.0)


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _windows(x, k, stride, padding, pad_value=0.0):
    """x[N,C,H,W] -> [N,C,HO,WO,k,k] (a view of the padded input)."""
    if padding:
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), constant_values=pad_value)
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))
    return win[:, :, ::stride, ::stride]


def conv2d(x, w, b=None, stride=1, padding=0):
    """out[n,o,i,j] = Σ_{c,u,v} x_pad[n, c, i·stride+u, j·stride+v] · w[o,c,u,v] (+ b[o])."""
    if w.shape[2] == 1 and w.shape[3] == 1 and padding == 0:
        out = np.einsum("nchw,oc->nohw", x[:, :, ::stride, ::stride], w[:, :, 0, 0], optimize=True)
    else:
        win = _windows(x, w.shape[2], stride, padding)                     # N C HO WO KH KW
        out = np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3]))           # N HO WO O
        out = out.transpose(0, 3, 1, 2)
    if b is not None:
        out = out + b[None, :, None, None]
    return np.ascontiguousarray(out)


def avg_pool2d(x, k, stride=None, padding=0):
    return _windows(x, k, stride or k, padding).mean(axis=(-2, -1))


def max_pool2d(x, k, stride=None, padding=0):
    return _windows(x, k, stride or k, padding, pad_value=-np.inf).max(axis=(-2, -1))


def global_avg_pool(x):
    """[N,C,H,W] -> [N,C]."""
    return x.mean(axis=(2, 3))


def batch_norm(x, mean, var, gamma, beta, eps=1e-5):
    """Inference batch norm per channel of x[N,C,H,W]: (x - mean) / sqrt(var + eps) * gamma + beta."""
    scale = gamma / np.sqrt(var + eps)
    return (x - mean[None, :, None, None]) * scale[None, :, None, None] + beta[None, :, None, None]


def f64(tree):
    """Weights/inputs as float64 (floating leaves only) so that references are an accurate oracle."""
    if isinstance(tree, dict):
        return {k: f64(v) for k, v in tree.items()}
    a = np.asarray(tree)
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a

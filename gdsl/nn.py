"""Neural-network functions (`import gdsl.nn`). Activations are NCHW, convolution weights OIHW."""
from __future__ import annotations

import math

from gdsl import dtypes
from gdsl import numpy as gnp
from gdsl.primitives import elementwise as ew
from gdsl.primitives import nn as nn_prims
from gdsl.tracing.trace import bind1, type_error


def _float(x):
    x = gnp.asarray(x)
    return x if dtypes.is_float(x.dtype) else gnp.astype(x, dtypes.float32)


def sigmoid(x):
    """1 / (1 + exp(-x))"""
    return bind1(ew.UNARY_PRIMS["logistic"], _float(x))


def relu(x):
    """max(x, 0)"""
    return gnp.maximum(x, 0)


def tanh(x):
    return gnp.tanh(x)


def gelu(x, approximate=True):
    """x * Φ(x); with approximate=True (JAX's default) Φ uses the tanh formula, else erf."""
    x = _float(x)
    if approximate:
        inner = gnp.multiply(math.sqrt(2 / math.pi), gnp.add(x, gnp.multiply(0.044715, gnp.power(x, 3))))
        return gnp.multiply(gnp.multiply(0.5, x), gnp.add(1, gnp.tanh(inner)))
    erf = bind1(ew.UNARY_PRIMS["erf"], gnp.multiply(x, 1 / math.sqrt(2)))
    return gnp.multiply(gnp.multiply(0.5, x), gnp.add(1, erf))


def softmax(x, axis=-1):
    """exp(x - max) / sum(exp(x - max)) along `axis`."""
    x = _float(x)
    e = gnp.exp(gnp.subtract(x, gnp.max(x, axis=axis, keepdims=True)))
    return gnp.divide(e, gnp.sum(e, axis=axis, keepdims=True))


def log_softmax(x, axis=-1):
    x = _float(x)
    shifted = gnp.subtract(x, gnp.max(x, axis=axis, keepdims=True))
    return gnp.subtract(shifted, gnp.log(gnp.sum(gnp.exp(shifted), axis=axis, keepdims=True)))


def linear(x, w, b=None):
    """x @ w + b, with w[in_features, out_features] (the transpose of PyTorch's Linear.weight)."""
    y = gnp.matmul(x, w)
    return y if b is None else gnp.add(y, b)


def conv2d(x, w, b=None, *, stride=1, padding=0):
    """Cross-correlation of x[N,C,H,W] with w[O,C,KH,KW] (as torch.nn.functional.conv2d), plus b[O]."""
    x, w = gnp._promote(gnp.asarray(x) if not hasattr(x, "shape") else x, w)
    y = bind1(nn_prims.conv2d_p, x, w, stride=int(stride), padding=int(padding))
    if b is not None:
        y = gnp.add(y, gnp.reshape(b, (1, -1, 1, 1)))
    return y


def _pool(prim, x, kernel_size, stride, padding):
    stride = kernel_size if stride is None else stride
    if 2 * padding > kernel_size:
        raise type_error(f"pooling: padding {padding} must be at most half the window {kernel_size}")
    return bind1(prim, x, window=int(kernel_size), stride=int(stride), padding=int(padding))


def avg_pool2d(x, kernel_size, stride=None, padding=0):
    """Average over square windows; padded zeros count toward the average (PyTorch's default)."""
    return _pool(nn_prims.avg_pool2d_p, _float(x), kernel_size, stride, padding)


def max_pool2d(x, kernel_size, stride=None, padding=0):
    return _pool(nn_prims.max_pool2d_p, _float(x), kernel_size, stride, padding)


def global_avg_pool(x):
    """x[N,C,H,W] -> mean over H and W: [N,C]."""
    return gnp.mean(x, axis=(2, 3))


def batch_norm(x, mean, var, weight=None, bias=None, eps=1e-5):
    """Inference batch norm over the channel axis 1: (x - mean) / sqrt(var + eps) * weight + bias."""
    shape = (1, -1) + (1,) * (len(x.shape) - 2)
    scale = gnp.divide(1.0, gnp.sqrt(gnp.add(var, eps)))
    if weight is not None:
        scale = gnp.multiply(scale, weight)
    y = gnp.multiply(gnp.subtract(x, gnp.reshape(mean, shape)), gnp.reshape(scale, shape))
    return y if bias is None else gnp.add(y, gnp.reshape(bias, shape))

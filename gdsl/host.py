"""Results back on the host: `gdsl.to_numpy`."""
from __future__ import annotations

import numpy as np

from gdsl.tracing.pytree import tree_map


def to_numpy(x):
    """Any result (or pytree of results: numpy, CuPy, dlpack objects) as numpy arrays."""
    def convert(leaf):
        if hasattr(leaf, "get") and type(leaf).__module__.startswith("cupy"):
            return leaf.get()
        if hasattr(leaf, "__array__"):
            return np.asarray(leaf)
        if hasattr(leaf, "__dlpack__"):
            return np.from_dlpack(leaf)
        return np.asarray(leaf)
    return tree_map(convert, x)

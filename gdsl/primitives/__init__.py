"""All primitives, registered on import (see registry.py)."""
from gdsl.primitives import control, elementwise, linalg, nn, reductions, structural  # noqa: F401
from gdsl.primitives.registry import REGISTRY, Primitive, primitive  # noqa: F401

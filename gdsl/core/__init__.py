"""The IR that every layer shares: types, variables, equations, programs (`ir.py`), their printer and
type checker. Core imports nothing of gdsl but dtypes; tracing, primitives, the scheduler and the
backends all import it."""

"""Profiling a persistent kernel: every vEU records when it runs each uTask, waits at each barrier and
enters each loop iteration, branch case and recursive call (`gdsl.profile`, docs/profile.md).

    sites.py    the trace layout both backends render: event sites numbered from the plan, the buffer
                bounds, the record format
    profile.py  `gdsl.profile` / `gdsl.Profile`: the instrumented run, decoding, Chrome trace, summary, plot
"""
from gdsl.profiling.profile import Profile, profile  # noqa: F401

__all__ = ["Profile", "profile"]

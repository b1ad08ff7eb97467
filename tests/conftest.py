"""Suite-wide settings.

- GDSL_CHECK=1: every program traced in the suite is type-checked (gdsl.core.typecheck) as it is built.
- Hypothesis profiles: "ci" (the default: small, deterministic, fast enough for `pytest -n 2` in CI),
  "dev" (fewer examples, for quick local loops) and "thorough" (many examples, for hunting bugs):
  select one with HYPOTHESIS_PROFILE=thorough.
- The `gpu` marker (declared in pyproject.toml): such tests are skipped where no CUDA GPU is usable.
"""
import os

os.environ["GDSL_CHECK"] = "1"  # before any test traces a program

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=25, derandomize=True, **_COMMON)
settings.register_profile("dev", max_examples=10, **_COMMON)
settings.register_profile("thorough", max_examples=500, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _cuda_usable() -> bool:
    try:
        from gdsl.backends.cuda import runtime
        return bool(runtime.cuda_usable())
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device: all mean "no GPU"
        return False


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and not _cuda_usable():
        skip = pytest.mark.skip(reason="needs a usable CUDA GPU")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture
def rendered_sources(monkeypatch):
    """The sources the C-family lowerings render while the test runs (a list, filled as they are rendered)."""
    from gdsl.backends.cfamily import lower
    rendered = []
    real = lower.render_plan

    def capture(*args, **kwargs):
        rendered.append(real(*args, **kwargs))
        return rendered[-1]
    monkeypatch.setattr(lower, "render_plan", capture)
    return rendered

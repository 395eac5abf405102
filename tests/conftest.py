"""Fixtures shared by every test; the helpers themselves live in tests/helpers.py."""
import os
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile hundreds of tiny programs: unoptimised LLVM code compiles in half the time
# (the same HLO and results). The runs the tests start get the same flags (tests/integration/
# tiny.py, FAST_XLA_FLAGS).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                                   "--xla_llvm_disable_expensive_passes=true")

# One persistent XLA compilation cache for the runs the tests start in subprocesses: they
# compile the same tiny programs again and again (a demo-shaped run took 58 s cold, 24 s warm
# on 2 cores). Fresh per session. This process keeps JAX's in-memory cache only (writing every
# program of the unit tests to disk made them slower: 8 min 0 s against 6 min 44 s).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="mta_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (after the variables above)

from tests.helpers import HF_SHAPES  # noqa: E402  (after JAX_PLATFORMS)

jax.config.update("jax_enable_compilation_cache", False)


@pytest.fixture(params=sorted(HF_SHAPES))
def hf_shape(request):
    return request.param


def pytest_sessionfinish(session, exitstatus):
    """Under CI=true a skipped test fails the run: parity against PyTorch must really run."""
    if not os.environ.get("CI") or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped; skips are failures in CI "
                            "(install the test extras: pip install -e '.[test]')", red=True)
        session.exitstatus = 1

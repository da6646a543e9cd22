"""Test-session settings shared by every test file.

* Under pytest-xdist each worker gives the binaries it starts in subprocesses a compilation cache of its own
  (``$JAXINF_COMPILATION_CACHE`` = <default cache>/pytest-<worker>), so two workers never write one cache
  directory at once. A cache chosen by the caller (the variable already set) is left alone.
* The cheaper-compilation CPU flags the binaries use (``jaxinf.runtime.add_cpu_compile_flags``) are set here too,
  before any test starts jax's backend: the default job is mostly XLA compilation of tiny models.
* ``--tiny-seed=N`` (an audit, not the default job) shifts every in-process tiny random model's initialisation
  seed by N, to find tests that hold for one draw of random weights only.
"""

import os

import pytest

from jaxinf import runtime
from jaxinf.models import registry

runtime.add_cpu_compile_flags()

_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker and runtime.ENV_VAR not in os.environ:
    os.environ[runtime.ENV_VAR] = os.path.join(runtime.default_cache_dir(), f"pytest-{_worker}")


def pytest_addoption(parser):
    parser.addoption("--tiny-seed", type=int, default=0,
                     help="shift the initialisation seed of in-process tiny random models by N (robustness audit)")


@pytest.fixture(autouse=True, scope="session")
def _tiny_seed(request):
    shift = request.config.getoption("--tiny-seed")
    if not shift:
        yield
        return
    original = registry.tiny_decoder
    registry.tiny_decoder = lambda name, *, seed=0, **kw: original(name, seed=seed + shift, **kw)
    try:
        yield
    finally:
        registry.tiny_decoder = original

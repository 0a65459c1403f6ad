"""Test setup: import path, a shared XLA compilation cache, jit helpers."""

import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Many tests (and their subprocesses, which inherit the environment) compile
# the same tiny networks; XLA compilation dominates the suite's time on 2
# cores. Must be set before jax is imported.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'nfnets_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position


def jitted(model):
  """(init, apply) of a transformed model, jitted with is_training static.

  Eager Haiku compiles every op on its own (about 0.1 s each on this CPU), so
  tests always jit. Call init(rng, images, is_training) and
  apply(params, state, rng, images, is_training, return_stats=False).
  """
  init = jax.jit(model.init, static_argnums=2)
  apply = jax.jit(model.apply, static_argnums=(4, 5))
  return init, lambda p, s, r, x, train, stats=False: apply(p, s, r, x, train,
                                                            stats)


# The test process is an entry point: it applies the CPU process settings
# the scripts apply, before any test creates the JAX backend.
from nfnets.cpu import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

runtime.configure_process()


@pytest.fixture
def conv_impl(monkeypatch):
  """Sets NFNETS_CONV_IMPL for one test (nfnets.ops reads it once, cached)."""
  from nfnets import ops  # pylint: disable=g-import-not-at-top

  def set_impl(value):
    monkeypatch.setenv(ops.IMPL_ENV_VAR, value)
    ops.configured_impl.cache_clear()
  yield set_impl
  monkeypatch.delenv(ops.IMPL_ENV_VAR, raising=False)
  ops.configured_impl.cache_clear()

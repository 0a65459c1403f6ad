"""nfnets/cpu/reductions.py: the CPU forms of weight standardization, bias
add, channel sums, BatchNorm statistics and max-pooling equal the formulas
in nfnets/layers.py (value and gradients, against float64 autodiff), and
nfnets.ops takes them exactly on CPU."""

import functools
import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import layers
from nfnets import ops


# max |error| / max |reference| of the float32 CPU forms against float64
# autodiff of the direct form; float32 rounding gives a few 1e-7.
RELATIVE_TOLERANCE = 1e-5


def _relative_error(value, reference) -> float:
  value, reference = np.asarray(value, np.float64), np.asarray(reference)
  return float(np.max(np.abs(value - reference)) / np.max(np.abs(reference)))


def _primitives(jaxpr) -> set:
  """Names of every primitive in a jaxpr, sub-jaxprs included."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      names |= _primitives(sub)
  return names


# (kernel shape, eps, weight offset): 1x1, 3x3, a stem-like 7x7, grouped
# fan-in; eps 1e9 floors every channel; offset 3 gives a large mean.
WS_CASES = [((1, 1, 32, 64), 1e-4, 0.0), ((3, 3, 16, 8), 1e-4, 3.0),
            ((7, 7, 3, 16), 1e-4, 0.0), ((3, 3, 2, 6), 1e-4, 0.0),
            ((3, 3, 4, 5), 1e9, 0.0)]


@pytest.mark.parametrize('shape,eps,offset', WS_CASES)
def test_cpu_standardize_weight_matches_float64_autodiff(shape, eps, offset):
  assert ops.cpu_forms_active()
  rng = np.random.default_rng(sum(shape))
  weight = offset + rng.standard_normal(shape)
  gain = 1 + 0.5 * rng.standard_normal(shape[-1])
  cotangent = rng.standard_normal(shape)

  def value_and_grads(fn, *args):
    out, vjp = jax.vjp(lambda w, g: fn(w, g, eps), *args[:2])
    return (out, *vjp(args[2]))

  with jax.enable_x64(True):
    reference = jax.jit(functools.partial(
        value_and_grads, layers.standardize_weight.formula))(
            *(jnp.asarray(a, jnp.float64) for a in (weight, gain, cotangent)))
    reference = [np.asarray(r) for r in reference]
  args32 = [jnp.asarray(a, jnp.float32) for a in (weight, gain, cotangent)]
  got = jax.jit(functools.partial(value_and_grads, layers.standardize_weight))(
      *args32)
  for name, value, want in zip(('value', 'grad w', 'grad gain'), got,
                               reference):
    assert value.shape == want.shape and value.dtype == jnp.float32, name
    assert _relative_error(value, want) < RELATIVE_TOLERANCE, name
  # Every sum is a matmul: no reduction left for XLA:CPU's slow forms.
  jaxpr = jax.make_jaxpr(functools.partial(
      value_and_grads, layers.standardize_weight))(*args32)
  assert 'dot_general' in _primitives(jaxpr.jaxpr)
  assert not {'reduce_sum', 'reduce_max'} & _primitives(jaxpr.jaxpr)


def test_cpu_add_bias_matches_float64_autodiff():
  rng = np.random.default_rng(0)
  x, bias = rng.standard_normal((3, 5, 4, 7)), rng.standard_normal(7)
  cotangent = rng.standard_normal(x.shape)

  def value_and_grads(fn, x, bias, cotangent):
    out, vjp = jax.vjp(fn, x, bias)
    return (out, *vjp(cotangent))

  with jax.enable_x64(True):
    reference = [np.asarray(r) for r in value_and_grads(
        lambda x, b: x + b,
        *(jnp.asarray(a, jnp.float64) for a in (x, bias, cotangent)))]
  got = value_and_grads(layers.add_bias, *(jnp.asarray(a, jnp.float32)
                                           for a in (x, bias, cotangent)))
  for value, want in zip(got, reference):
    assert value.shape == want.shape and value.dtype == jnp.float32
    assert _relative_error(value, want) < RELATIVE_TOLERANCE


def test_cpu_add_bias_gradient_of_bfloat16_accumulates_in_float32():
  # 4096 terms: a bfloat16 running sum would lose most of them.
  out_grad = jnp.full((4096, 3), 0.01, jnp.bfloat16)
  _, vjp = jax.vjp(layers.add_bias, jnp.zeros_like(out_grad),
                   jnp.zeros(3, jnp.bfloat16))
  bias_grad = vjp(out_grad)[1]
  assert bias_grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bias_grad, np.float32),
                             4096 * float(jnp.bfloat16(0.01)), rtol=1e-2)


def test_cpu_batch_norm_statistics_match_float64_autodiff():
  """Training-mode BatchNorm (batch sums by layers.channel_sums): output,
  input gradient and the updated moving averages agree with float64
  jnp.mean / jnp.var and autodiff."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((4, 6, 5, 7)) * 2 + rng.standard_normal(7)
  cotangent = rng.standard_normal(x.shape)
  decay, eps = 0.9, 1e-5

  def reference(x):
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.var(x, axis=(0, 1, 2))
    return (x - mean) * jax.lax.rsqrt(var + eps), (mean, var)

  with jax.enable_x64(True):
    x64 = jnp.asarray(x, jnp.float64)
    out, vjp, (mean, var) = jax.vjp(reference, x64, has_aux=True)
    want = [np.asarray(out), np.asarray(vjp(jnp.asarray(cotangent))[0]),
            np.asarray(0.1 * mean), np.asarray(decay + 0.1 * var)]
  model = hk.transform_with_state(
      lambda x: layers.BatchNorm(decay, eps, name='bn')(x, True))
  params, state = model.init(None, jnp.zeros(x.shape))
  def apply(x):
    return model.apply(params, state, None, x)
  x32 = jnp.asarray(x, jnp.float32)
  (out, new_state), vjp = jax.vjp(apply, x32)
  grad = vjp((jnp.asarray(cotangent, jnp.float32),
              jax.tree.map(jnp.zeros_like, new_state)))[0]
  got = [out, grad, new_state['bn']['mean'], new_state['bn']['var']]
  for value, expected in zip(got, want):
    assert _relative_error(value, expected) < RELATIVE_TOLERANCE


def test_channel_sums_are_accurate_over_many_rows():
  """10^5 positions per channel: within 1e-6 of float64 (a matmul with a
  row of ones accumulates sequentially and is off by ~1.6e-5 here)."""
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((8, 128, 128, 16)) + 0.3).astype(np.float32)
  want = x.astype(np.float64).sum(axis=(0, 1, 2))
  got = np.asarray(jax.jit(layers.channel_sums)(x), np.float64)
  assert np.max(np.abs(got - want) / np.abs(want)) < 1e-6


MAX_POOL_CASES = [((2, 9, 9, 3), 3, 2, 'SAME'), ((2, 8, 8, 3), 3, 2, 'SAME'),
                  ((1, 7, 6, 2), 3, 1, 'SAME'), ((1, 7, 6, 2), 2, 2, 'VALID'),
                  ((2, 10, 9, 4), (3, 2), (2, 1), 'SAME')]


def _hk_max_pool(window, stride, padding):
  window = (window, window) if isinstance(window, int) else window
  stride = (stride, stride) if isinstance(stride, int) else stride
  return lambda x: hk.max_pool(x, (1, *window, 1), (1, *stride, 1), padding)


@pytest.mark.parametrize('shape,window,stride,padding', MAX_POOL_CASES)
def test_cpu_max_pool_matches_haiku_value_and_gradient(shape, window, stride,
                                                       padding):
  assert ops.cpu_forms_active()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  out, vjp = jax.vjp(lambda x: layers.max_pool(x, window, stride, padding), x)
  want, want_vjp = jax.vjp(_hk_max_pool(window, stride, padding), x)
  cotangent = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
  np.testing.assert_array_equal(out, want)
  # Sums of at most kh * kw cotangents per input pixel, in another order.
  np.testing.assert_allclose(vjp(cotangent)[0], want_vjp(cotangent)[0],
                             rtol=1e-6, atol=1e-6)


def test_cpu_max_pool_gives_ties_gradient_to_the_first_maximum():
  """Many equal values (small integers): every output's gradient goes to
  the first maximum of its window in row-major order, as XLA's does, so the
  gradient sums to the cotangent's sum and equals haiku's exactly."""
  x = jnp.asarray(np.random.default_rng(1).integers(0, 3, (2, 8, 8, 3)),
                  jnp.float32)
  grad = jax.grad(lambda x: jnp.sum(layers.max_pool(x, 3, 2)))(x)
  want = jax.grad(lambda x: jnp.sum(_hk_max_pool(3, 2, 'SAME')(x)))(x)
  np.testing.assert_array_equal(grad, want)
  assert float(grad.sum()) == 2 * 4 * 4 * 3
  jaxpr = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(layers.max_pool(x))))(x)
  assert 'select_and_scatter_add' not in _primitives(jaxpr.jaxpr)


def test_plain_impl_and_other_backends_keep_the_direct_forms(monkeypatch):
  monkeypatch.setenv(ops.IMPL_ENV_VAR, 'plain')
  ops.configured_impl.cache_clear()
  try:
    assert not ops.cpu_forms_active()
    weight, gain = jnp.ones((3, 3, 4, 5)), jnp.ones(5)
    jaxpr = jax.make_jaxpr(jax.grad(lambda w, g: jnp.sum(
        layers.standardize_weight(w, g, 1e-4)), (0, 1)))(weight, gain)
    assert 'dot_general' not in _primitives(jaxpr.jaxpr)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(layers.max_pool(x))))(
        jnp.ones((1, 4, 4, 2)))
    assert not any('custom_vjp' in name for name in _primitives(jaxpr.jaxpr))
  finally:
    monkeypatch.delenv(ops.IMPL_ENV_VAR)
    ops.configured_impl.cache_clear()
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert not ops.cpu_forms_active()


def test_deterministic_max_pool_gradient_has_no_select_and_scatter(
    monkeypatch):
  # On GPU with deterministic kernels, XLA cannot compile select-and-scatter
  # (the formula's max-pool gradient): config.deterministic switches the
  # max-pool to its scatter-free form on every backend.
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))

  def grad(x):  # a new function each time: no trace is reused
    return jax.grad(lambda x: jnp.sum(layers.max_pool(x) ** 2))(x)

  monkeypatch.setenv(ops.IMPL_ENV_VAR, 'plain')
  ops.configured_impl.cache_clear()
  ops.deterministic_requested.cache_clear()
  try:
    plain = str(jax.make_jaxpr(lambda x: grad(x))(x))
    monkeypatch.setenv(ops.DETERMINISTIC_ENV_VAR, '1')
    ops.deterministic_requested.cache_clear()
    deterministic = str(jax.make_jaxpr(lambda x: grad(x))(x))
    np.testing.assert_allclose(grad(x), _hk_grad(x), rtol=1e-6)
  finally:
    monkeypatch.undo()
    ops.configured_impl.cache_clear()
    ops.deterministic_requested.cache_clear()
  assert 'select_and_scatter' in plain
  assert 'select_and_scatter' not in deterministic


def _hk_grad(x):
  return jax.grad(lambda x: jnp.sum(_hk_max_pool(3, 2, 'SAME')(x) ** 2))(x)

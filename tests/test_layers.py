"""Scaled WS convolution, activation gains and stochastic depth."""

import functools
import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import activations
from nfnets import conv
from nfnets import layers


def _ws_conv(x, **kwargs):
  return hk.transform(lambda x: layers.WSConv2D(**kwargs)(x)).init(
      jax.random.key(0), x)


@pytest.mark.parametrize('kernel,groups', [(1, 1), (3, 1), (3, 4), (7, 2)])
def test_standardized_kernel_has_zero_mean_and_unit_fan_in_variance(
    kernel, groups):
  in_channels, out_channels = 8, 12
  fan_in = kernel * kernel * in_channels // groups
  weight = 3.0 + 2.0 * jax.random.normal(
      jax.random.key(1), (kernel, kernel, in_channels // groups, out_channels))
  gain = jax.random.uniform(jax.random.key(2), (out_channels,), minval=0.5,
                            maxval=2.0)
  w_hat = layers.standardize_weight(weight, gain, eps=1e-4)
  np.testing.assert_allclose(w_hat.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(fan_in * w_hat.var(axis=(0, 1, 2)), gain**2,
                             rtol=1e-4)


def test_eps_floors_fan_in_variance_instead_of_adding():
  # Large variance: the floor is inactive, the result is exact.
  weight = jax.random.normal(jax.random.key(0), (3, 3, 4, 2))
  w_hat = layers.standardize_weight(weight, jnp.ones(2), eps=1e-4)
  np.testing.assert_allclose(36 * w_hat.var(axis=(0, 1, 2)), 1.0, rtol=1e-5)
  # Tiny variance: fan_in * var = 36 * 1e-8 < eps, so the scale is 1/sqrt(eps).
  tiny = 1e-4 * jax.random.normal(jax.random.key(1), (3, 3, 4, 2))
  w_hat = layers.standardize_weight(tiny, jnp.ones(2), eps=1e-4)
  expected = (tiny - tiny.mean(axis=(0, 1, 2))) / math.sqrt(1e-4)
  np.testing.assert_allclose(w_hat, expected, rtol=1e-5, atol=1e-9)
  # A constant kernel stays finite (zero) instead of dividing by zero.
  w_hat = layers.standardize_weight(jnp.ones((1, 1, 3, 2)), jnp.ones(2), 1e-4)
  assert np.all(np.isfinite(w_hat)) and np.all(w_hat == 0)


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
  assert layers.cpu_reduction_forms()
  rng = np.random.default_rng(sum(shape))
  weight = offset + rng.standard_normal(shape)
  gain = 1 + 0.5 * rng.standard_normal(shape[-1])
  cotangent = rng.standard_normal(shape)

  def value_and_grads(fn, *args):
    out, vjp = jax.vjp(lambda w, g: fn(w, g, eps), *args[:2])
    return (out, *vjp(args[2]))

  with jax.enable_x64(True):
    reference = jax.jit(functools.partial(
        value_and_grads, layers.standardize_weight_reference))(
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
  window, stride = layers._pair(window), layers._pair(stride)
  return lambda x: hk.max_pool(x, (1, *window, 1), (1, *stride, 1), padding)


@pytest.mark.parametrize('shape,window,stride,padding', MAX_POOL_CASES)
def test_cpu_max_pool_matches_haiku_value_and_gradient(shape, window, stride,
                                                       padding):
  assert layers.cpu_reduction_forms()
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


def test_max_pool_rejects_bad_input():
  x = jnp.zeros((2, 8, 8, 3))
  with pytest.raises(ValueError, match="padding must be 'SAME' or 'VALID'.*"
                     "'FULL'"):
    layers.max_pool(x, 3, 2, 'FULL')
  with pytest.raises(ValueError, match=r'window must be.*got 0\.'):
    layers.max_pool(x, 0, 2)
  with pytest.raises(ValueError, match=r'stride must be.*\(1, 1, 1, 1\)'):
    layers.max_pool(x, 3, (1, 1, 1, 1))
  with pytest.raises(ValueError, match=r'floating-point.*int32 \(2, 8, 8\)'):
    layers.max_pool(jnp.zeros((2, 8, 8), jnp.int32))
  with pytest.raises(ValueError, match=r'window \(9, 9\) is larger.*8x8'):
    layers.max_pool(x, 9, 1, 'VALID')


def test_plain_impl_and_other_backends_keep_the_direct_forms(monkeypatch):
  monkeypatch.setenv(conv.IMPL_ENV_VAR, 'plain')
  conv.configured_impl.cache_clear()
  try:
    assert not layers.cpu_reduction_forms()
    weight, gain = jnp.ones((3, 3, 4, 5)), jnp.ones(5)
    jaxpr = jax.make_jaxpr(jax.grad(lambda w, g: jnp.sum(
        layers.standardize_weight(w, g, 1e-4)), (0, 1)))(weight, gain)
    assert 'dot_general' not in _primitives(jaxpr.jaxpr)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(layers.max_pool(x))))(
        jnp.ones((1, 4, 4, 2)))
    assert not any('custom_vjp' in name for name in _primitives(jaxpr.jaxpr))
  finally:
    monkeypatch.delenv(conv.IMPL_ENV_VAR)
    conv.configured_impl.cache_clear()
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert not layers.cpu_reduction_forms()


def test_ws_conv_preserves_mean_zero_and_variance_at_init():
  x = jax.random.normal(jax.random.key(0), (16, 16, 16, 32))
  model = hk.transform(lambda x: layers.WSConv2D(64, 3, padding='VALID')(x))
  params = model.init(jax.random.key(1), x)
  assert set(params['ws_conv2_d']) == {'w', 'gain', 'bias'}
  out = model.apply(params, None, x)
  assert out.shape == (16, 14, 14, 64)
  np.testing.assert_allclose(out.mean(), 0, atol=0.05)
  np.testing.assert_allclose(out.var(axis=(0, 1, 2)).mean(), 1.0, rtol=0.05)


def test_ws_conv_params_are_float32_and_compute_in_input_dtype():
  x = jnp.ones((2, 8, 8, 4), jnp.bfloat16)
  model = hk.transform(
      lambda x: layers.WSConv2D(6, 3, stride=2, feature_group_count=2)(x))
  params = model.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert params['ws_conv2_d']['w'].shape == (3, 3, 2, 6)
  out = model.apply(params, None, x)
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 4, 4, 6)


def test_ws_conv_rejects_channels_not_divisible_by_groups():
  with pytest.raises(ValueError, match='feature_group_count=4'):
    _ws_conv(jnp.ones((1, 4, 4, 6)), output_channels=8, feature_group_count=4)


def test_relu_gamma_is_closed_form_and_quadrature_agrees():
  assert activations.gamma('relu') == pytest.approx(
      math.sqrt(2 / (1 - 1 / math.pi)), rel=1e-12)
  _, variance = activations.gaussian_moments(jax.nn.relu)
  assert 1 / math.sqrt(variance) == pytest.approx(
      activations.gamma('relu'), rel=1e-6)
  # Other closed forms the integrator must reproduce.
  assert activations.gamma('identity') == pytest.approx(1.0, rel=1e-6)
  assert activations.gamma('selu') == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize(
    'name', list(activations.ACTIVATIONS) + list(activations.ALIASES))
def test_gamma_gives_unit_variance_by_monte_carlo(name):
  z = jax.random.normal(jax.random.key(0), (4_000_000,))
  out = activations.get_activation(name)(z)
  assert float(jnp.var(out)) == pytest.approx(1.0, rel=0.01)


def test_gamma_override_and_unknown_activation():
  fn = activations.get_activation('silu', gain=2.5)
  np.testing.assert_allclose(fn(jnp.ones(3)), 2.5 * jax.nn.silu(1.0), rtol=1e-6)
  with pytest.raises(ValueError, match="'swoosh'.*allowed.*relu"):
    activations.get_activation('swoosh')
  assert 'relu' in activations.gamma_table()


def test_stochastic_depth_drops_whole_examples_and_rescales():
  x = jnp.ones((20_000, 2, 2, 3))
  fn = hk.transform(lambda x, scale: layers.stochastic_depth(
      x, 0.25, is_training=True, scale_by_keep=scale))
  rng = jax.random.key(0)
  out = fn.apply({}, rng, x, True)
  per_example = out.reshape(out.shape[0], -1)
  assert np.all(per_example.min(axis=1) == per_example.max(axis=1))
  assert float(jnp.mean(out == 0)) == pytest.approx(0.25, abs=0.01)
  assert float(out.mean()) == pytest.approx(1.0, abs=0.02)
  assert float(fn.apply({}, rng, x, False).mean()) == pytest.approx(
      0.75, abs=0.01)
  evaluation = hk.transform(lambda x: layers.stochastic_depth(
      x, 0.25, is_training=False, scale_by_keep=True))
  np.testing.assert_array_equal(evaluation.apply({}, None, x), x)

"""The layers as the paper writes them: Scaled WS statistics, WS conv at
init, max-pool argument checks, stochastic depth. (Their CPU forms:
test_cpu_reductions.py and test_cpu_conv.py.)"""

import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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

"""Activation gains: gamma in closed form and by quadrature, unit variance
by Monte Carlo, overrides and unknown names."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import activations


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

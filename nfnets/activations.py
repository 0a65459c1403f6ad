"""Nonlinearities and their variance-preserving gains (gamma).

Scaled Weight Standardization keeps the mean of every conv output at zero and
its variance equal to the variance of the conv input. Multiplying a
nonlinearity g by gamma = 1 / std(g(z)), z ~ N(0, 1), makes the activation map
unit-variance inputs to unit-variance outputs, so a residual branch built from
gamma-scaled activations and Scaled-WS convolutions preserves variance at
initialization (paper, Section 4).

Gamma is computed here, never copied: in closed form for ReLU, by numerical
integration against the standard normal density for everything else.

Run `python -m nfnets.activations` to print the gamma table.
"""

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Activation = Callable[[jax.Array], jax.Array]

ACTIVATIONS: dict[str, Activation] = {
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'tanh': jnp.tanh,
    'elu': jax.nn.elu,
    'celu': jax.nn.celu,
    'leaky_relu': jax.nn.leaky_relu,  # negative slope 0.01
    'relu6': jax.nn.relu6,
    'selu': jax.nn.selu,
    'softplus': jax.nn.softplus,
    'sigmoid': jax.nn.sigmoid,
    'soft_sign': jax.nn.soft_sign,
    'log_sigmoid': jax.nn.log_sigmoid,
    'identity': lambda x: x,
}
ALIASES = {'swish': 'silu'}

# Points where some registered activation is not smooth (relu, relu6, elu,
# celu, leaky_relu, selu at 0; relu6 at 6): quadrature panels end there.
_KINKS = (0.0, 6.0)
# N(0, 1) has mass below 1e-40 beyond 13.5 standard deviations.
_INTEGRATION_LIMIT = 14.0


def canonical_name(name: str) -> str:
  """Resolves aliases; raises ValueError naming the allowed activations."""
  name = ALIASES.get(name, name)
  if name not in ACTIVATIONS:
    allowed = sorted(list(ACTIVATIONS) + list(ALIASES))
    raise ValueError(f'Unknown activation {name!r}; allowed: {allowed}.')
  return name


def relu_gamma() -> float:
  """Closed form: Var(relu(z)) = 1/2 - 1/(2 pi), so gamma = sqrt(2/(1-1/pi))."""
  return math.sqrt(2.0 / (1.0 - 1.0 / math.pi))


@functools.cache
def _gaussian_quadrature_rule(
    panel_width: float = 0.5, order: int = 24) -> tuple[np.ndarray, np.ndarray]:
  """Nodes and weights w_i with sum_i w_i f(x_i) ~= E[f(z)], z ~ N(0, 1).

  Composite Gauss-Legendre over [-14, 14] in panels whose edges include every
  kink in _KINKS, so the integrand is smooth inside each panel and the rule
  converges to far below float32 resolution.
  """
  edges = np.arange(-_INTEGRATION_LIMIT, _INTEGRATION_LIMIT + 1e-9, panel_width)
  assert all(np.isclose(edges, k).any() for k in _KINKS)
  unit_nodes, unit_weights = np.polynomial.legendre.leggauss(order)
  left, right = edges[:-1, None], edges[1:, None]
  nodes = (left + right) / 2 + (right - left) / 2 * unit_nodes
  weights = (right - left) / 2 * unit_weights
  density = np.exp(-nodes**2 / 2) / math.sqrt(2 * math.pi)
  return nodes.ravel(), (weights * density).ravel()


def gaussian_moments(fn: Activation) -> tuple[float, float]:
  """(E[fn(z)], Var[fn(z)]) for z ~ N(0, 1), by numerical integration.

  fn is evaluated in float32 (JAX's default); the quadrature sums run in
  float64, so the relative error is about 1e-7.
  """
  nodes, weights = _gaussian_quadrature_rule()
  # Concrete values even when first called while a model is being traced.
  with jax.ensure_compile_time_eval():
    values = np.asarray(fn(jnp.asarray(nodes, jnp.float32)), np.float64)
  mean = float(np.sum(weights * values))
  variance = float(np.sum(weights * (values - mean)**2))
  return mean, variance


@functools.cache
def gamma(name: str) -> float:
  """The gain that gives gamma * g(z), z ~ N(0, 1), unit variance."""
  name = canonical_name(name)
  if name == 'relu':
    return relu_gamma()
  _, variance = gaussian_moments(ACTIVATIONS[name])
  return 1.0 / math.sqrt(variance)


def get_activation(name: str, gain: float | None = None) -> Activation:
  """Returns x -> gain * g(x); gain defaults to gamma(name).

  Args:
    name: a key of ACTIVATIONS or ALIASES.
    gain: an explicit multiplier (e.g. 1.0 for the unscaled nonlinearity).
  """
  name = canonical_name(name)
  fn = ACTIVATIONS[name]
  gain = gamma(name) if gain is None else float(gain)
  if gain == 1.0:
    return fn
  return lambda x: fn(x) * jnp.asarray(gain, x.dtype)


def gamma_table() -> str:
  """A text table: activation, E[g(z)], Var[g(z)], gamma."""
  lines = [f'{"activation":<12} {"E[g(z)]":>10} {"Var[g(z)]":>10} '
           f'{"gamma":>10}']
  for name in ACTIVATIONS:
    mean, variance = gaussian_moments(ACTIVATIONS[name])
    lines.append(f'{name:<12} {mean:>10.6f} {variance:>10.6f} '
                 f'{gamma(name):>10.6f}')
  aliases = ', '.join(f'{a} = {n}' for a, n in ALIASES.items())
  lines.append(f'(aliases: {aliases}; relu gamma in closed form, '
               'the rest by quadrature)')
  return '\n'.join(lines)


if __name__ == '__main__':
  print(gamma_table())

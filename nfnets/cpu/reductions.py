"""Reductions that XLA:CPU runs fast, as forms of `nfnets.layers` functions.

XLA:CPU turns a sum over leading axes into reduce-window ops (its
tree-reduction pass) or a slow column reduction. Weight standardization
(forward and backward), bias gradients and batch statistics are such sums;
here each is a matmul with a row of ones or a two-step row sum, and
max-pooling's backward a set of masks instead of select-and-scatter. Each
function has the signature and result (up to float32 rounding) of the
`nfnets.layers` function of the same name; `nfnets.ops` calls it in its
place on CPU. tests/test_cpu_reductions.py checks values and gradients
against float64 autodiff; docs/performance.md ("CPU rewrites") gives what
each saves.
"""

import functools

import jax
import jax.numpy as jnp

from nfnets.cpu import conv


def channel_sums(x: jax.Array) -> jax.Array:
  """x [..., W, C] -> [C], the sums over every axis but the last, in x.dtype
  (accumulated in at least float32).

  Summed as rows [N*H, W*C] over axis 0, then [W, C] over W: XLA:CPU
  reduces [N*H*W, C] over its long axis slower. (A matmul with a row of
  ones is as fast but accumulates sequentially, far less accurately over
  10^5 rows, which a BatchNorm gradient amplifies.)
  """
  accumulate = jnp.promote_types(x.dtype, jnp.float32)
  if x.ndim < 3:
    sums = jnp.sum(x, axis=tuple(range(x.ndim - 1)), dtype=accumulate)
  else:
    width, channels = x.shape[-2:]
    rows = x.reshape(-1, width * channels)
    sums = jnp.sum(rows, axis=0, dtype=accumulate).reshape(
        width, channels).sum(axis=0)
  return sums.astype(x.dtype)


def _column_sums(matrix: jax.Array) -> jax.Array:
  """[K, C] -> [1, C] in matrix.dtype, the sums over K as one [1, K] x
  [K, C] matmul, accumulated in at least float32. For fan-in sums (K up to
  a few thousand: ~2e-6 relative, sequential accumulation)."""
  accumulate = jnp.promote_types(matrix.dtype, jnp.float32)
  sums = jax.lax.dot(jnp.ones((1, matrix.shape[0]), matrix.dtype), matrix,
                     preferred_element_type=accumulate)
  return sums.astype(matrix.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _standardize_columns(weight, gain, eps, form):
  return _standardize_columns_fwd(weight, gain, eps, form)[0]


def _spread(sum_of_squares, eps, fan_in, form):
  """(the value whose rsqrt scales the kernel, its derivative in
  sum_of_squares): max(u, eps) for the authors' form ('authors'),
  u + fan_in * eps for timm's (nfnets.layers.standardize_weight)."""
  if form == 'authors':
    # d max(u, eps)/du as jnp.maximum's gradient: 1 above, 1/2 at a tie.
    above = jnp.where(sum_of_squares > eps, 1.0,
                      jnp.where(sum_of_squares == eps, 0.5, 0.0))
    return (jnp.maximum(sum_of_squares, eps),
            above.astype(sum_of_squares.dtype))
  if form == 'timm':
    return sum_of_squares + fan_in * eps, jnp.ones_like(sum_of_squares)
  raise ValueError(f"Unknown ws_form {form!r}; allowed: ('authors', 'timm').")


def _standardize_columns_fwd(weight, gain, eps, form):
  """weight [fan_in, C_out], gain [1, C_out]: the same two-pass mean and
  variance as jnp.mean / jnp.var, each sum a matmul."""
  centered = weight - _column_sums(weight) / weight.shape[0]
  sum_of_squares = _column_sums(centered * centered)  # fan_in * var
  spread, _ = _spread(sum_of_squares, eps, weight.shape[0], form)
  inv_std = jax.lax.rsqrt(spread)
  return centered * (inv_std * gain), (centered, sum_of_squares, inv_std,
                                       gain)


def _standardize_columns_bwd(eps, form, residuals, out_grad):
  """Autodiff's gradient of the forward, with its sums (over fan_in) as
  matmuls. With c = W - mean, u = sum c^2, r = rsqrt(s(u)) (s: _spread),
  out = c * r * gain: dL/dgain = r sum(g c), dL/dc = g r gain + 2 c
  sum(g c) gain dr/du, dL/dW = dL/dc - mean(dL/dc)."""
  centered, sum_of_squares, inv_std, gain = residuals
  grad_scale = _column_sums(out_grad * centered)  # dL/d(inv_std * gain)
  _, d_spread = _spread(sum_of_squares, eps, centered.shape[0], form)
  d_inv_std = -0.5 * inv_std**3 * d_spread
  centered_grad = (out_grad * (inv_std * gain)
                   + centered * (2 * grad_scale * gain * d_inv_std))
  weight_grad = (centered_grad
                 - _column_sums(centered_grad) / centered.shape[0])
  return weight_grad, grad_scale * inv_std


_standardize_columns.defvjp(_standardize_columns_fwd, _standardize_columns_bwd)


def standardize_weight(weight: jax.Array, gain: jax.Array, eps: float,
                       form: str = 'authors') -> jax.Array:
  """`nfnets.layers.standardize_weight` with every sum over the fan-in,
  forward and backward (custom VJP), a matmul with a row of ones."""
  weight, gain = conv.match_varying(weight, gain)
  out = _standardize_columns(weight.reshape(-1, weight.shape[-1]),
                             gain.reshape(1, -1), eps, form)
  return out.reshape(weight.shape)


@jax.custom_vjp
def _add_bias_channel_sums_grad(x, bias):
  return x + bias


def _add_bias_fwd(x, bias):
  return x + bias, None


def _add_bias_bwd(_, out_grad):
  return out_grad, channel_sums(out_grad)


_add_bias_channel_sums_grad.defvjp(_add_bias_fwd, _add_bias_bwd)


def add_bias(x: jax.Array, bias: jax.Array) -> jax.Array:
  """x [..., C] + bias [C], the bias gradient by `channel_sums` (custom
  VJP)."""
  x, bias = conv.match_varying(x, bias)
  return _add_bias_channel_sums_grad(x, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_of_windows(x, window, strides, pads):
  return functools.reduce(jnp.maximum, conv.strided_windows(
      x, window, strides, pads, pad_value=-jnp.inf))


def _max_of_windows_fwd(x, window, strides, pads):
  out = _max_of_windows(x, window, strides, pads)
  return out, (x, out)


def _max_of_windows_bwd(window, strides, pads, residuals, out_grad):
  x, out = residuals
  windows = conv.strided_windows(x, window, strides, pads, pad_value=-jnp.inf)
  taken = jnp.zeros(out.shape, bool)
  window_grads = []
  for values in windows:
    # Each output's gradient goes to the first maximum in row-major window
    # order, as XLA's select-and-scatter does.
    chosen = (values == out) & ~taken
    taken = taken | chosen
    window_grads.append(jnp.where(chosen, out_grad, 0))
  return (conv.strided_windows_transpose(window_grads, x.shape, window,
                                         strides, pads),)


_max_of_windows.defvjp(_max_of_windows_fwd, _max_of_windows_bwd)


def pool_max(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: str) -> jax.Array:
  """`nfnets.layers.pool_max` as the max of the kh * kw strided
  windows, with a custom VJP that routes each output's gradient to the first
  maximum of its window (as XLA does) by masks and
  `conv.strided_windows_transpose`. Reverse mode only (jax.jvp of a custom
  VJP raises). A window holding NaN passes no gradient (no element equals
  its NaN maximum); XLA's passes it to one element. The loss is NaN by then
  either way."""
  pads = jax.lax.padtype_to_pads(x.shape[1:3], window, strides, padding)
  return _max_of_windows(x, window, strides,
                         tuple(tuple(int(p) for p in pair) for pair in pads))

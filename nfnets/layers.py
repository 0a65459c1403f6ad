"""Layers shared by every model: convolutions, max pooling, squeeze-excite,
stochastic depth."""

import functools
from typing import Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets import conv


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


def cpu_reduction_forms() -> bool:
  """Whether `standardize_weight`, `add_bias` and `max_pool` take their
  CPU forms.

  True on CPU (`jax.default_backend()` when traced) unless
  NFNETS_CONV_IMPL=plain (nfnets.conv), which rules every rewrite out.
  XLA:CPU (jax 0.10.2) turns a sum over leading axes into reduce-window ops
  (its tree-reduction pass) or a slow column reduction: in an NF-ResNet-50
  train step at 64 px those sums (weight standardization forward and
  backward, bias gradients) took about a third of the step, against a few
  ms as matmuls with a row of ones (weight standardization, fan-in rows)
  or `channel_sums` (bias gradients).
  """
  return conv.configured_impl() == 'auto' and jax.default_backend() == 'cpu'


def channel_sums(x: jax.Array) -> jax.Array:
  """x [..., W, C] -> [C], the sums over every axis but the last, in x.dtype
  (accumulated in at least float32).

  For batch and signal statistics over N, H, W, and bias gradients. Summed
  as rows [N*H, W*C] over axis 0, then [W, C] over W. XLA:CPU reduces
  [N*H*W, C] over its long axis 2-3x slower. A matmul with a row of ones
  (as `_column_sums`) is as fast but accumulates sequentially: 100x less
  accurate at 10^5 rows (1.6e-5 against 1.6e-7 relative), which a
  BatchNorm gradient amplifies.
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


def channel_means(x: jax.Array) -> jax.Array:
  """x [..., W, C] -> [C], the means over every axis but the last
  (`channel_sums` / count)."""
  return channel_sums(x) / (x.size // x.shape[-1])


def _column_sums(matrix: jax.Array) -> jax.Array:
  """[K, C] -> [1, C] in matrix.dtype, the sums over K as one [1, K] x
  [K, C] matmul, accumulated in at least float32. For fan-in sums (K up to
  a few thousand: ~2e-6 relative, sequential accumulation)."""
  accumulate = jnp.promote_types(matrix.dtype, jnp.float32)
  sums = jax.lax.dot(jnp.ones((1, matrix.shape[0]), matrix.dtype), matrix,
                     preferred_element_type=accumulate)
  return sums.astype(matrix.dtype)


def standardize_weight_reference(weight: jax.Array, gain: jax.Array,
                                 eps: float) -> jax.Array:
  """`standardize_weight` written directly (jnp.mean, jnp.var, autodiff):
  what runs on GPU and TPU. Same arguments and result."""
  fan_in = weight.shape[0] * weight.shape[1] * weight.shape[2]
  mean = jnp.mean(weight, axis=(0, 1, 2), keepdims=True)
  var = jnp.var(weight, axis=(0, 1, 2), keepdims=True)
  scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain
  return (weight - mean) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _standardize_columns(weight, gain, eps):
  return _standardize_columns_fwd(weight, gain, eps)[0]


def _standardize_columns_fwd(weight, gain, eps):
  """weight [fan_in, C_out], gain [1, C_out]: the same two-pass mean and
  variance as jnp.mean / jnp.var, each sum a matmul."""
  centered = weight - _column_sums(weight) / weight.shape[0]
  sum_of_squares = _column_sums(centered * centered)  # fan_in * var
  inv_std = jax.lax.rsqrt(jnp.maximum(sum_of_squares, eps))
  return centered * (inv_std * gain), (centered, sum_of_squares, inv_std,
                                       gain)


def _standardize_columns_bwd(eps, residuals, out_grad):
  """Autodiff's gradient of the forward, with its sums (over fan_in) as
  matmuls. With c = W - mean, u = sum c^2, r = rsqrt(max(u, eps)),
  out = c * r * gain: dL/dgain = r sum(g c), dL/dc = g r gain + 2 c
  sum(g c) gain dr/du, dL/dW = dL/dc - mean(dL/dc)."""
  centered, sum_of_squares, inv_std, gain = residuals
  grad_scale = _column_sums(out_grad * centered)  # dL/d(inv_std * gain)
  # d max(u, eps)/du as jnp.maximum's gradient: 1 above, 1/2 at a tie.
  above = jnp.where(sum_of_squares > eps, 1.0,
                    jnp.where(sum_of_squares == eps, 0.5, 0.0))
  d_inv_std = -0.5 * inv_std**3 * above.astype(inv_std.dtype)
  centered_grad = (out_grad * (inv_std * gain)
                   + centered * (2 * grad_scale * gain * d_inv_std))
  weight_grad = (centered_grad
                 - _column_sums(centered_grad) / centered.shape[0])
  return weight_grad, grad_scale * inv_std


_standardize_columns.defvjp(_standardize_columns_fwd, _standardize_columns_bwd)


def standardize_weight(weight: jax.Array, gain: jax.Array,
                       eps: float) -> jax.Array:
  """Scaled Weight Standardization of an HWIO kernel.

  W_hat = gain * (W - mean) / sqrt(max(fan_in * var, eps)), with mean and var
  over each output channel's fan-in (axes H, W, I), so every output channel
  has mean 0 and fan_in * Var(W_hat) = gain^2.

  On CPU (`cpu_reduction_forms`) every sum over the fan-in, forward and
  backward (custom VJP), is a matmul with a row of ones; elsewhere it is
  `standardize_weight_reference`. Same value and gradients up to float32
  rounding (tests/test_layers.py).

  Args:
    weight: [kh, kw, in_channels // groups, out_channels] float32.
    gain: [out_channels] float32.
    eps: floor on fan_in * var (the reference code's semantics: a floor, not an
      additive epsilon). It only matters for kernels that are (nearly)
      constant over their fan-in, which it keeps finite.

  Returns:
    The standardized kernel, float32, same shape as weight.
  """
  if not cpu_reduction_forms():
    return standardize_weight_reference(weight, gain, eps)
  weight, gain = conv.match_varying(weight, gain)
  out = _standardize_columns(weight.reshape(-1, weight.shape[-1]),
                             gain.reshape(1, -1), eps)
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
  """x [..., C] + bias [C]. On CPU (`cpu_reduction_forms`) the bias
  gradient, the sum of the output gradient over every other axis, is
  `channel_sums` (custom VJP); elsewhere plain autodiff."""
  if not cpu_reduction_forms():
    return x + bias
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


def max_pool(x: jax.Array, window: int | Sequence[int] = 3,
             stride: int | Sequence[int] = 2, padding: str = 'SAME'
             ) -> jax.Array:
  """Max pooling over H and W of x [N, H, W, C] -> [N, H', W', C].

  Pads with -inf ('SAME' or 'VALID'); x must be floating point. On CPU
  (`cpu_reduction_forms`) the
  max of the kh * kw strided windows, with a custom VJP that routes each
  output's gradient to the first maximum of its window (as XLA does) by
  masks and `conv.strided_windows_transpose`. After the 64 px
  NF-ResNet-50 stem ([32, 32, 32, 64]) that backward takes 1.8 ms against
  34 ms for XLA:CPU's select-and-scatter of `hk.max_pool`. Elsewhere
  `hk.max_pool`. Reverse mode only on CPU (jax.jvp of a custom VJP
  raises). A window holding NaN passes no gradient on CPU (no element
  equals its NaN maximum); XLA's passes it to one element. The loss is NaN
  by then either way.
  """
  window = conv.positive_pair(window, 'max_pool window')
  strides = conv.positive_pair(stride, 'max_pool stride')
  if padding not in ('SAME', 'VALID'):
    raise ValueError(f"max_pool padding must be 'SAME' or 'VALID', got "
                     f'{padding!r}.')
  if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'max_pool expects floating-point x [N, H, W, C], got '
                     f'{x.dtype} {tuple(x.shape)}.')
  if padding == 'VALID' and (x.shape[1] < window[0]
                             or x.shape[2] < window[1]):
    raise ValueError(f'max_pool window {window} is larger than the '
                     f'{x.shape[1]}x{x.shape[2]} input with VALID padding.')
  if not cpu_reduction_forms():
    return hk.max_pool(x, (1, *window, 1), (1, *strides, 1), padding)
  pads = jax.lax.padtype_to_pads(x.shape[1:3], window, strides, padding)
  return _max_of_windows(x, window, strides,
                         tuple(tuple(int(p) for p in pair) for pair in pads))


class WSConv2D(hk.Module):
  """2D convolution with Scaled Weight Standardization (NHWC in and out).

  Parameters (always float32, whatever the input dtype): `w` [kh, kw,
  C_in / groups, C_out] with He-normal init (its scale cancels in the
  standardization), `gain` [C_out] init 1, `bias` [C_out] init 0. The
  convolution runs in the input's dtype.
  """

  def __init__(self, output_channels: int,
               kernel_shape: int | Sequence[int] = 3,
               stride: int | Sequence[int] = 1,
               padding: str = 'SAME',
               feature_group_count: int = 1,
               eps: float = 1e-4,
               name: str | None = None):
    super().__init__(name=name)
    self.output_channels = output_channels
    self.kernel_shape = _pair(kernel_shape)
    self.stride = _pair(stride)
    self.padding = padding
    self.feature_group_count = feature_group_count
    self.eps = eps

  def standardized_weight(self, in_channels: int) -> jax.Array:
    if in_channels % self.feature_group_count:
      raise ValueError(
          f'{in_channels} input channels are not divisible by '
          f'feature_group_count={self.feature_group_count}.')
    shape = (*self.kernel_shape, in_channels // self.feature_group_count,
             self.output_channels)
    w_init = hk.initializers.VarianceScaling(2.0, 'fan_in', 'normal')
    weight = hk.get_parameter('w', shape, jnp.float32, init=w_init)
    gain = hk.get_parameter('gain', (self.output_channels,), jnp.float32,
                            init=jnp.ones)
    return standardize_weight(weight, gain, self.eps)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, H, W, C_in] -> [N, H', W', C_out], in x.dtype."""
    weight = self.standardized_weight(x.shape[-1]).astype(x.dtype)
    bias = hk.get_parameter('bias', (self.output_channels,), jnp.float32,
                            init=jnp.zeros)
    out = conv.conv2d(x, weight, self.stride, self.padding,
                      self.feature_group_count)
    return add_bias(out, bias.astype(x.dtype))


class Conv2D(hk.Module):
  """Plain 2D convolution (NHWC) with Gaussian init N(0, scale^2 * 2 / fan_in).

  scale = 1 is He (Kaiming) normal init; Fixup passes its depth-dependent
  scale, and scale = 0 gives a zero-initialized kernel. Parameters are float32;
  the convolution runs in the input's dtype.
  """

  def __init__(self, output_channels: int,
               kernel_shape: int | Sequence[int] = 3,
               stride: int | Sequence[int] = 1,
               padding: str = 'SAME',
               feature_group_count: int = 1,
               init_scale: float = 1.0,
               with_bias: bool = False,
               name: str | None = None):
    super().__init__(name=name)
    self.output_channels = output_channels
    self.kernel_shape = _pair(kernel_shape)
    self.stride = _pair(stride)
    self.padding = padding
    self.feature_group_count = feature_group_count
    self.init_scale = init_scale
    self.with_bias = with_bias

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, H, W, C_in] -> [N, H', W', C_out], in x.dtype."""
    shape = (*self.kernel_shape, x.shape[-1] // self.feature_group_count,
             self.output_channels)
    if self.init_scale == 0:
      w_init = jnp.zeros
    else:
      w_init = hk.initializers.VarianceScaling(
          2.0 * self.init_scale**2, 'fan_in', 'normal')
    weight = hk.get_parameter('w', shape, jnp.float32, init=w_init)
    out = conv.conv2d(x, weight.astype(x.dtype), self.stride, self.padding,
                      self.feature_group_count)
    if self.with_bias:
      bias = hk.get_parameter('bias', (self.output_channels,), jnp.float32,
                              init=jnp.zeros)
      out = add_bias(out, bias.astype(x.dtype))
    return out


def scalar_parameter(name: str, init_value: float, dtype) -> jax.Array:
  """A learnable float32 scalar (skip gain, Fixup bias/multiplier), cast to dtype."""
  value = hk.get_parameter(name, (), jnp.float32,
                           init=hk.initializers.Constant(init_value))
  return value.astype(dtype)


class SqueezeExcite(hk.Module):
  """Squeeze-and-excitation: x * 2 * sigmoid(MLP(mean_hw(x))).

  The factor 2 keeps the variance of x roughly unchanged at init, where the
  sigmoid sits near 1/2 (as in the reference code).
  """

  def __init__(self, hidden_channels: int, activation, name=None):
    super().__init__(name=name)
    self.hidden_channels = hidden_channels
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, H, W, C] -> [N, H, W, C]."""
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    hidden = self.activation(hk.Linear(self.hidden_channels, name='reduce')(pooled))
    excite = jax.nn.sigmoid(hk.Linear(x.shape[-1], name='expand')(hidden))
    return x * (2 * excite[:, None, None, :]).astype(x.dtype)


def stochastic_depth(x: jax.Array, drop_rate: float, is_training: bool,
                     scale_by_keep: bool) -> jax.Array:
  """Zeroes whole examples of a residual branch output with prob. drop_rate.

  Args:
    x: [N, ...] residual-branch output.
    drop_rate: probability of dropping, in [0, 1): a Python float, or a
      traced scalar (a per-layer input of a scanned stack of blocks).
    is_training: identity when False.
    scale_by_keep: divide kept examples by (1 - drop_rate) so the expected
      output matches evaluation (the reference code does not rescale).
  """
  if not is_training or (isinstance(drop_rate, (int, float)) and drop_rate == 0):
    return x
  keep_rate = 1.0 - drop_rate
  keep = jax.random.bernoulli(hk.next_rng_key(), keep_rate,
                              (x.shape[0],) + (1,) * (x.ndim - 1))
  x = x * keep.astype(x.dtype)
  return x / jnp.asarray(keep_rate, x.dtype) if scale_by_keep else x


class BatchNorm(hk.Module):
  """BatchNorm over (N, H, W) for NHWC inputs, statistics in float32.

  Parameters `scale` (init 1) and `offset` (init 0) and states `mean`
  (init 0) and `var` (init 1), all float32 [C]. Training mode normalizes with
  the batch statistics (averaged over `axis_name` when given, for
  data-parallel training) and updates the moving averages with `decay`;
  evaluation uses the moving averages.

  Written here rather than using hk.BatchNorm, whose train step was 3x slower
  in a BN-ResNet-50 on CPU (7.2 vs 2.5 s per step at 64 px, batch 32). The
  batch means go through `channel_means` (a faster, more accurate reduction
  order on CPU).
  """

  def __init__(self, decay: float, eps: float, axis_name: str | None = None,
               name: str | None = None):
    super().__init__(name=name)
    self.decay, self.eps, self.axis_name = decay, eps, axis_name

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    """x: [N, H, W, C] -> same shape and dtype."""
    channels = x.shape[-1]
    scale = hk.get_parameter('scale', (channels,), jnp.float32, init=jnp.ones)
    offset = hk.get_parameter('offset', (channels,), jnp.float32,
                              init=jnp.zeros)
    moving_mean = hk.get_state('mean', (channels,), jnp.float32,
                               init=jnp.zeros)
    moving_var = hk.get_state('var', (channels,), jnp.float32, init=jnp.ones)
    x32 = x.astype(jnp.float32)
    if is_training:
      mean = channel_means(x32)
      mean_of_squares = channel_means(jnp.square(x32))
      if self.axis_name:
        mean, mean_of_squares = jax.lax.pmean((mean, mean_of_squares),
                                              self.axis_name)
      var = jnp.maximum(mean_of_squares - jnp.square(mean), 0.0)
      hk.set_state('mean', self.decay * moving_mean
                   + (1 - self.decay) * jax.lax.stop_gradient(mean))
      hk.set_state('var', self.decay * moving_var
                   + (1 - self.decay) * jax.lax.stop_gradient(var))
    else:
      mean, var = moving_mean, moving_var
    multiplier = jax.lax.rsqrt(var + self.eps) * scale
    return ((x32 - mean) * multiplier + offset).astype(x.dtype)


def check_image_size(total_stride: int, height: int,
                     width: int | None = None) -> None:
  """Raises ValueError if the image is smaller than the network's total
  stride (px)."""
  for size in (height, height if width is None else width):
    if size < total_stride:
      raise ValueError(
          f'Image size {size} px is too small: the network downsamples by '
          f'{total_stride}, so images must be at least {total_stride} px.')


def classifier_head(x: jax.Array, num_classes: int, dropout_rate: float,
                    is_training: bool, w_init) -> jax.Array:
  """Global average pool (float32), dropout when training, linear layer
  'classifier'. x: [N, H, W, C] -> logits float32 [N, num_classes]."""
  features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
  if is_training and dropout_rate > 0:
    features = hk.dropout(hk.next_rng_key(), dropout_rate, features)
  return hk.Linear(num_classes, w_init=w_init, name='classifier')(features)

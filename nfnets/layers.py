"""Layers shared by every model: the convolution and Scaled Weight
Standardization, max pooling, BatchNorm, squeeze-excite, stochastic depth
and the classifier head.

The primitives marked `@ops.replaceable` are written as their formulas; on
CPU, `nfnets.ops` swaps in faster forms of the same sums (package
`nfnets.cpu`).
"""

from typing import Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets import ops

DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
  """(h, w) from an int or a pair of ints, all >= 1; ValueError naming
  `name` and the value otherwise."""
  pair = (value, value) if isinstance(value, int) else tuple(value)
  if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
    raise ValueError(f'{name} must be a positive int or a pair of them '
                     f'(H, W), got {value!r}.')
  return pair


Padding = str | Sequence[tuple[int, int]]
PADDINGS = ('same', 'symmetric')


def window_padding(mode: str, window: int | Sequence[int],
                   stride: int | Sequence[int]) -> Padding:
  """The `padding` argument of a conv or max-pool with this window and
  stride: 'same' -> 'SAME' (TensorFlow's, the authors' code: at stride 2 the
  extra pixel goes after the input), 'symmetric' -> ((p_h, p_h), (p_w, p_w))
  with p = (stride - 1 + window - 1) // 2 on both sides (PyTorch's, as timm
  pads: 3 for 7x7/2, 1 for 3x3, 0 for 1x1)."""
  if mode == 'same':
    return 'SAME'
  if mode == 'symmetric':
    return tuple((p, p) for p in (
        (s - 1 + k - 1) // 2 for k, s in zip(_pair(window, 'window'),
                                             _pair(stride, 'stride'))))
  raise ValueError(f'Unknown padding {mode!r}; allowed: {PADDINGS}.')


@ops.replaceable
def conv2d(x: jax.Array, weight: jax.Array, stride: tuple[int, int],
           padding: Padding, feature_group_count: int) -> jax.Array:
  """x [N, H, W, C_in] convolved with weight [kh, kw, C_in / groups, C_out]
  (same dtype) -> [N, H', W', C_out]; padding 'SAME', 'VALID' or explicit
  ((lo, hi), (lo, hi)) pixels (zeros)."""
  return jax.lax.conv_general_dilated(
      x, weight, window_strides=stride, padding=padding,
      dimension_numbers=DIMENSION_NUMBERS,
      feature_group_count=feature_group_count)


# How Scaled WS divides by the kernel's spread: the authors' floor on
# fan_in * Var(W) (the default), or timm's epsilon added to Var(W).
WS_FORMS = ('authors', 'timm')


@ops.replaceable
def standardize_weight(weight: jax.Array, gain: jax.Array, eps: float,
                       form: str = 'authors') -> jax.Array:
  """Scaled Weight Standardization of an HWIO kernel.

  'authors': W_hat = gain * (W - mean) / sqrt(max(fan_in * var, eps))
  'timm':    W_hat = gain * (W - mean) / sqrt(fan_in * (var + eps))
  with mean and var (biased) over each output channel's fan-in (axes H, W,
  I), so every output channel has mean 0 and fan_in * Var(W_hat) = gain^2
  (up to eps).

  Args:
    weight: [kh, kw, in_channels // groups, out_channels] float32.
    gain: [out_channels] float32.
    eps: 'authors': a floor on fan_in * var (the reference code's
      semantics), which only matters for kernels that are (nearly) constant
      over their fan-in; 'timm': added to var (timm's ScaledStdConv2d,
      F.batch_norm's eps), which also shrinks small-variance kernels.
    form: one of WS_FORMS.

  Returns:
    The standardized kernel, float32, same shape as weight.
  """
  fan_in = weight.shape[0] * weight.shape[1] * weight.shape[2]
  mean = jnp.mean(weight, axis=(0, 1, 2), keepdims=True)
  var = jnp.var(weight, axis=(0, 1, 2), keepdims=True)
  if form == 'authors':
    scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain
  elif form == 'timm':
    scale = jax.lax.rsqrt((var + eps) * fan_in) * gain
  else:
    raise ValueError(f'Unknown ws_form {form!r}; allowed: {WS_FORMS}.')
  return (weight - mean) * scale


@ops.replaceable
def add_bias(x: jax.Array, bias: jax.Array) -> jax.Array:
  """x [..., C] + bias [C]."""
  return x + bias


@ops.replaceable
def channel_sums(x: jax.Array) -> jax.Array:
  """x [..., C] -> [C], the sums over every axis but the last, in x.dtype
  (accumulated in at least float32)."""
  accumulate = jnp.promote_types(x.dtype, jnp.float32)
  return jnp.sum(x, axis=tuple(range(x.ndim - 1)),
                 dtype=accumulate).astype(x.dtype)


def channel_means(x: jax.Array) -> jax.Array:
  """x [..., C] -> [C], the means over every axis but the last (batch and
  signal statistics over N, H, W)."""
  return channel_sums(x) / (x.size // x.shape[-1])


@ops.replaceable
def pool_max(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: str) -> jax.Array:
  """The max over each window of x [N, H, W, C], padded with -inf."""
  return hk.max_pool(x, (1, *window, 1), (1, *strides, 1), padding)


def max_pool(x: jax.Array, window: int | Sequence[int] = 3,
             stride: int | Sequence[int] = 2, padding: Padding = 'SAME'
             ) -> jax.Array:
  """Max pooling over H and W of x [N, H, W, C] -> [N, H', W', C].

  Pads with -inf: 'SAME', 'VALID', or explicit ((lo, hi), (lo, hi)) pixels
  (e.g. window_padding('symmetric', 3, 2), PyTorch's MaxPool2d(3, 2, 1));
  x must be floating point.
  """
  window = _pair(window, 'max_pool window')
  strides = _pair(stride, 'max_pool stride')
  explicit = not isinstance(padding, str)
  if explicit:
    pads = tuple(tuple(pair) for pair in padding)
    if len(pads) != 2 or any(len(pair) != 2 or min(pair) < 0
                             for pair in pads):
      raise ValueError(f"max_pool padding must be 'SAME' or 'VALID' or "
                       f'((lo, hi), (lo, hi)) pixels >= 0, got {padding!r}.')
  elif padding not in ('SAME', 'VALID'):
    raise ValueError(f"max_pool padding must be 'SAME' or 'VALID' or "
                     f'((lo, hi), (lo, hi)) pixels, got {padding!r}.')
  if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'max_pool expects floating-point x [N, H, W, C], got '
                     f'{x.dtype} {tuple(x.shape)}.')
  if explicit:
    # Padded here and pooled VALID: both forms of pool_max take it as is.
    x = jax.lax.pad(x, jnp.asarray(-jnp.inf, x.dtype),
                    [(0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)])
    padding = 'VALID'
  if padding == 'VALID' and (x.shape[1] < window[0]
                             or x.shape[2] < window[1]):
    raise ValueError(f'max_pool window {window} is larger than the '
                     f'{x.shape[1]}x{x.shape[2]} input with VALID padding.')
  return pool_max(x, window, strides, padding)


def avg_pool_downsample(x: jax.Array, stride: int) -> jax.Array:
  """x [N, H, W, C] averaged over stride x stride windows at that stride
  (a ResNet-D / NF-RegNet shortcut): SAME padding, each window averaged over
  its pixels inside the image, so at stride 2 an odd side's last window
  holds one row or column: PyTorch's AvgPool2d(2, 2, ceil_mode=True,
  count_include_pad=False)."""
  return hk.avg_pool(x, window_shape=(1, stride, stride, 1),
                     strides=(1, stride, stride, 1), padding='SAME')


BETA_PLACEMENTS = ('before_activation', 'after_activation')


def nf_branch_input(x: jax.Array, expected_std, activation,
                    beta_placement: str) -> jax.Array:
  """What the residual branch (and a transition block's shortcut conv) of
  an NF block sees: act(x / beta) ('before_activation', the paper's
  f(x / beta)) or act(x) / beta ('after_activation', the authors' NF-RegNet
  code). The same for ReLU, which is positively homogeneous; for other
  nonlinearities 'after' feeds the activation a variance-beta^2 input.

  x: [N, H, W, C]; expected_std: beta, a Python or traced scalar.
  """
  if beta_placement == 'before_activation':
    return activation(x / jnp.asarray(expected_std, x.dtype))
  if beta_placement == 'after_activation':
    return activation(x) * jnp.asarray(1.0 / expected_std, x.dtype)
  raise ValueError(f'Unknown beta_placement {beta_placement!r}; allowed: '
                   f'{BETA_PLACEMENTS}.')


class WSConv2D(hk.Module):
  """2D convolution with Scaled Weight Standardization (NHWC in and out).

  Parameters (always float32, whatever the input dtype): `w` [kh, kw,
  C_in / groups, C_out] with He-normal init (its scale cancels in the
  standardization), `gain` [C_out] init 1, `bias` [C_out] init 0. The
  convolution runs in the input's dtype. The kernel it applies is
  standardize_weight(w, gain * gamma, eps, form): gamma, a constant, is 1
  except where an activation's gamma is folded into the conv (timm's
  NF-ResNets, ws_form 'timm').
  """

  def __init__(self, output_channels: int,
               kernel_shape: int | Sequence[int] = 3,
               stride: int | Sequence[int] = 1,
               padding: Padding = 'SAME',
               feature_group_count: int = 1,
               eps: float = 1e-4,
               form: str = 'authors',
               gamma: float = 1.0,
               name: str | None = None):
    super().__init__(name=name)
    self.output_channels = output_channels
    self.kernel_shape = _pair(kernel_shape, 'kernel_shape')
    self.stride = _pair(stride, 'stride')
    self.padding = padding
    self.feature_group_count = feature_group_count
    self.eps = eps
    self.form = form
    self.gamma = gamma

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
    if self.gamma != 1.0:
      gain = gain * self.gamma
    return standardize_weight(weight, gain, self.eps, self.form)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, H, W, C_in] -> [N, H', W', C_out], in x.dtype."""
    weight = self.standardized_weight(x.shape[-1]).astype(x.dtype)
    bias = hk.get_parameter('bias', (self.output_channels,), jnp.float32,
                            init=jnp.zeros)
    out = conv2d(x, weight, self.stride, self.padding,
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
               padding: Padding = 'SAME',
               feature_group_count: int = 1,
               init_scale: float = 1.0,
               with_bias: bool = False,
               name: str | None = None):
    super().__init__(name=name)
    self.output_channels = output_channels
    self.kernel_shape = _pair(kernel_shape, 'kernel_shape')
    self.stride = _pair(stride, 'stride')
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
    out = conv2d(x, weight.astype(x.dtype), self.stride, self.padding,
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

  Written here rather than using hk.BatchNorm so that the batch means go
  through `channel_means` (on CPU, a faster reduction: docs/performance.md).
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


def global_average_pool(x: jax.Array) -> jax.Array:
  """[N, H, W, C] -> float32 [N, C]: the mean over H and W."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def classifier_head(x: jax.Array, num_classes: int, dropout_rate: float,
                    is_training: bool, w_init) -> jax.Array:
  """Global average pool (float32), dropout when training, linear layer
  'classifier'. x: [N, H, W, C] -> logits float32 [N, num_classes]."""
  features = global_average_pool(x)
  if is_training and dropout_rate > 0:
    features = hk.dropout(hk.next_rng_key(), dropout_rate, features)
  return hk.Linear(num_classes, w_init=w_init, name='classifier')(features)


def network_outputs(final: jax.Array, logits, stats, features):
  """What a model's __call__ returns: logits, stats, features, leaving out
  each that is None; one alone is returned as is, several as a tuple in
  that order. features (a dict) gains 'final', the map the classifier pools
  (before its dropout), and 'pooled', its global average (float32 [N, C])."""
  if features is not None:
    features['final'] = final
    features['pooled'] = global_average_pool(final)
  outputs = [out for out in (logits, stats, features) if out is not None]
  return outputs[0] if len(outputs) == 1 else tuple(outputs)


def backbone_transform(make_network) -> hk.TransformedWithState:
  """A model family's build_backbone: make_network() (its network module,
  under the name the full model uses) called for features only, without
  the classifier. apply(params, state, rng, images, is_training) ->
  (features, new_state)."""

  def forward(images, is_training):
    return make_network()(images, is_training, return_features=True,
                          with_classifier=False)

  return hk.transform_with_state(forward)

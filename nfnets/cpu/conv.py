"""Convolutions that XLA:CPU runs fast: `conv2d` picks, per shape, one of
the forms below, each the same sums as `jax.lax.conv_general_dilated` in
another order (exact up to float32 rounding; tests/test_cpu_conv.py checks
value and gradients against float64). `nfnets.ops` calls it in place of
`nfnets.layers.conv2d` on CPU. What each form gains is measured in
docs/performance.md ("CPU rewrites"), with `benchmarks/conv_shapes.py`.

  * 'im2col' (`im2col_conv2d`): kernels larger than 1x1 whose output map has
    at most MAX_IM2COL_OUTPUT_PIXELS pixels (stage 4 of a ResNet-50 at 64 px).
    XLA:CPU runs these slowly; as im2col the kh * kw shifted
    windows are concatenated along channels and multiplied with the reshaped
    kernel in one matmul.
  * 'lax_matmul_grads' (`conv_cpu_gradients`): 1x1 kernels. XLA's forward; a
    custom VJP computes the weight gradient as the matmul x^T @ dy and the
    input gradient as dy @ W^T spread back by an interior pad, instead of
    XLA:CPU's slower gradient convolutions.
  * 'lax_canonical_grads' (`conv_cpu_gradients`): the other ungrouped
    convolutions. XLA's forward; both gradients as convolutions in the
    forward's NHWC/HWIO form. Autodiff's weight-gradient convolution (batch
    and feature roles swapped) is fast on XLA:CPU only after its layout pass
    makes it canonical, which it does not inside a loop body (scanned
    blocks, `model.block_loop='scan'`).
  * 'lax_grouped_matmul_weight_grad' (`grouped_conv_cpu_gradients`): grouped
    convolutions (NF-RegNets' 3x3 convs). XLA:CPU runs their weight gradient
    (a convolution with batch_group_count) far slower than the forward; a
    custom VJP computes it as one matmul batched over the groups: patches
    [M, kh * kw, G, C_in / G] with out_grad [M, G, C_out / G], contracting the
    M = N * H' * W' output pixels (kh * kw / stride^2 times the input's
    memory).
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

# The forms conv2d runs ('lax': XLA's conv and autodiff, unused by
# choose_implementation but kept for benchmarks/conv_shapes.py).
IMPLEMENTATIONS = ('lax', 'im2col', 'lax_matmul_grads',
                   'lax_canonical_grads', 'lax_grouped_matmul_weight_grad')
DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')

# A conv with a kernel larger than 1x1 runs as im2col when its output map has
# at most this many pixels (out_h * out_w): faster than XLA:CPU's conv for
# 2x2 maps and below, slower from 4x4 up (building the patches dominates).
MAX_IM2COL_OUTPUT_PIXELS = 4

Padding = str | Sequence[tuple[int, int]]


def output_size(size: int, kernel: int, stride: int,
                pads: tuple[int, int]) -> int:
  """Output length (px) of one spatial axis of a convolution."""
  return (size + pads[0] + pads[1] - kernel) // stride + 1


def _validate(x_shape, weight_shape, stride, padding,
              feature_group_count) -> tuple[tuple[int, int], list]:
  """Checks the arguments; returns (stride pair, explicit [(lo, hi)] pads)."""
  if len(x_shape) != 4 or len(weight_shape) != 4:
    raise ValueError(f'conv2d expects x [N, H, W, C] and weight [kh, kw, '
                     f'C_in / groups, C_out]; got shapes {tuple(x_shape)} and '
                     f'{tuple(weight_shape)}.')
  strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
  if len(strides) != 2 or any(not isinstance(s, int) or s < 1
                              for s in strides):
    raise ValueError(f'stride must be a positive int or a pair of them '
                     f'(H, W), got {stride!r}.')
  if not isinstance(feature_group_count, int) or feature_group_count < 1:
    raise ValueError(f'feature_group_count must be a positive int, got '
                     f'{feature_group_count!r}.')
  in_channels, out_channels = x_shape[3], weight_shape[3]
  if (in_channels % feature_group_count
      or weight_shape[2] * feature_group_count != in_channels
      or out_channels % feature_group_count):
    raise ValueError(
        f'x has {in_channels} channels and the kernel {tuple(weight_shape)}: '
        f'need C_in = kernel in-channels ({weight_shape[2]}) x '
        f'feature_group_count ({feature_group_count}) and C_out divisible by '
        'feature_group_count.')
  if isinstance(padding, str):
    if padding.upper() not in ('SAME', 'VALID', 'SAME_LOWER'):
      raise ValueError(f"padding must be 'SAME', 'VALID', 'SAME_LOWER' or "
                       f'[(lo, hi), (lo, hi)], got {padding!r}.')
    pads = jax.lax.padtype_to_pads(x_shape[1:3], weight_shape[:2], strides,
                                   padding.upper())
  else:
    pads = [tuple(p) for p in padding]
    if len(pads) != 2 or any(len(p) != 2 for p in pads):
      raise ValueError(f"padding must be 'SAME', 'VALID', 'SAME_LOWER' or "
                       f'[(lo, hi), (lo, hi)], got {padding!r}.')
  for axis in range(2):
    if output_size(x_shape[1 + axis], weight_shape[axis], strides[axis],
                   pads[axis]) < 1:
      raise ValueError(f'input {tuple(x_shape)} with kernel '
                       f'{tuple(weight_shape)}, stride {strides} and padding '
                       f'{padding!r} has an empty output.')
  return strides, [tuple(p) for p in pads]


def choose_implementation(x_shape: Sequence[int],
                          weight_shape: Sequence[int],
                          stride: int | Sequence[int] = 1,
                          padding: Padding = 'SAME',
                          feature_group_count: int = 1) -> str:
  """Which of IMPLEMENTATIONS `conv2d` uses for this convolution on CPU.

  Args:
    x_shape: [N, H, W, C_in].
    weight_shape: [kh, kw, C_in / groups, C_out].
    stride, padding, feature_group_count: as for `conv2d`.
  """
  strides, pads = _validate(x_shape, weight_shape, stride, padding,
                            feature_group_count)
  if feature_group_count != 1:
    return 'lax_grouped_matmul_weight_grad'
  if weight_shape[0] * weight_shape[1] == 1:
    return 'lax_matmul_grads'
  out_h, out_w = (output_size(x_shape[1 + a], weight_shape[a], strides[a],
                              pads[a]) for a in range(2))
  if out_h * out_w <= MAX_IM2COL_OUTPUT_PIXELS:
    return 'im2col'
  return 'lax_canonical_grads'


def _lax_conv(x, weight, strides, pads, feature_group_count=1):
  return jax.lax.conv_general_dilated(
      x, weight, window_strides=strides, padding=pads,
      dimension_numbers=DIMENSION_NUMBERS,
      feature_group_count=feature_group_count)


def strided_windows(x: jax.Array, kernel_hw: tuple[int, int],
                    strides: tuple[int, int], pads,
                    pad_value: float = 0.0) -> list[jax.Array]:
  """The kh * kw shifted windows of x padded with pad_value, in row-major
  kernel order: window (i, j) is [N, H', W', C] and holds, at output pixel
  (n, y, x), the padded input at (n, y * stride_h + i, x * stride_w + j)."""
  kernel_h, kernel_w = kernel_hw
  stride_h, stride_w = strides
  batch, height, width, channels = x.shape
  out_h = output_size(height, kernel_h, stride_h, pads[0])
  out_w = output_size(width, kernel_w, stride_w, pads[1])
  if any(p != 0 for pair in pads for p in pair):
    # lax.pad (unlike jnp.pad) also takes negative (cropping) pads.
    x = jax.lax.pad(x, jnp.asarray(pad_value, x.dtype),
                    [(0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)])
  return [
      jax.lax.slice(x, (0, i, j, 0),
                    (batch, i + (out_h - 1) * stride_h + 1,
                     j + (out_w - 1) * stride_w + 1, channels),
                    (1, stride_h, stride_w, 1))
      for i in range(kernel_h) for j in range(kernel_w)]


def strided_windows_transpose(window_values: Sequence[jax.Array],
                              x_shape: Sequence[int],
                              kernel_hw: tuple[int, int],
                              strides: tuple[int, int], pads) -> jax.Array:
  """The transpose of `strided_windows`: [N, H, W, C] in which each pixel
  sums the values, over all windows, at the output pixels it fed.

  window_values: kh * kw arrays [N, H', W', C] in `strided_windows` order.
  Built per stride phase (padded pixels with the same remainders mod the
  stride), where window (i, j) is a plain shift: faster on
  XLA:CPU than autodiff's transpose (one interior pad of the whole padded
  input per window, then their sum).
  """
  kernel_h, kernel_w = kernel_hw
  if len(window_values) != kernel_h * kernel_w:
    raise ValueError(f'{len(window_values)} windows for a {kernel_h}x'
                     f'{kernel_w} kernel; expected {kernel_h * kernel_w}.')
  batch, height, width, channels = x_shape
  out_h, out_w = window_values[0].shape[1:3]
  padded = (height + pads[0][0] + pads[0][1], width + pads[1][0] + pads[1][1])
  # Phase grids: padded pixel p = y * stride + i is point y + i // stride
  # of phase i % stride.
  grid = [-(-padded[a] // strides[a]) for a in range(2)]
  zeros = jnp.zeros((batch, *grid, channels), window_values[0].dtype)
  phases = {}
  for index, values in enumerate(window_values):
    i, j = divmod(index, kernel_w)
    (phase_h, shift_h), (phase_w, shift_w) = (divmod(i, strides[0])[::-1],
                                              divmod(j, strides[1])[::-1])
    shifted = jax.lax.pad(values, jnp.zeros((), values.dtype), [
        (0, 0, 0), (shift_h, grid[0] - out_h - shift_h, 0),
        (shift_w, grid[1] - out_w - shift_w, 0), (0, 0, 0)])
    key = (phase_h, phase_w)
    phases[key] = shifted if key not in phases else phases[key] + shifted
  rows = [jnp.stack([phases.get((a, b), zeros) for b in range(strides[1])],
                    axis=3) for a in range(strides[0])]
  interleaved = jnp.stack(rows, axis=2).reshape(
      batch, grid[0] * strides[0], grid[1] * strides[1], channels)
  # Back to x's extent (a negative pad crops; a negative forward pad, which
  # dropped input pixels, becomes zeros).
  return jax.lax.pad(
      interleaved, jnp.zeros((), interleaved.dtype),
      [(0, 0, 0), (-pads[0][0], padded[0] - grid[0] * strides[0]
                   - pads[0][1], 0),
       (-pads[1][0], padded[1] - grid[1] * strides[1] - pads[1][1], 0),
       (0, 0, 0)])


def _patch_matrix(x: jax.Array, kernel_hw: tuple[int, int],
                  strides: tuple[int, int], pads) -> jax.Array:
  """[N * H' * W', kh * kw * C_in]: row (n, y, x) holds the input window of
  output pixel (n, y, x), ordered like an HWIO kernel reshaped to 2D."""
  windows = strided_windows(x, kernel_hw, strides, pads)
  batch, out_h, out_w, _ = windows[0].shape
  # Channel index (i * kw + j) * C_in + c matches the HWIO kernel reshaped.
  patches = windows[0] if len(windows) == 1 else jnp.concatenate(windows, -1)
  return patches.reshape(batch * out_h * out_w, -1)


def im2col_conv2d(x: jax.Array, weight: jax.Array,
                  stride: int | Sequence[int] = 1, padding: Padding = 'SAME'
                  ) -> jax.Array:
  """The ungrouped convolution as shifted windows concatenated, then one dot.

  Args:
    x: [N, H, W, C_in].
    weight: [kh, kw, C_in, C_out], same dtype as x.
    stride: int or (stride_h, stride_w).
    padding: 'SAME', 'VALID', 'SAME_LOWER' or [(lo, hi), (lo, hi)] pixels.

  Returns:
    [N, H', W', C_out], equal to `lax.conv_general_dilated` with NHWC/HWIO
    dimension numbers up to float rounding. The patch matrix it builds is
    kh * kw times the size of the output map times C_in. Gradients by
    autodiff: the input gradient is a matmul followed by the transposes of
    the slices (pads, summed), the weight gradient one matmul.
  """
  strides, pads = _validate(x.shape, weight.shape, stride, padding, 1)
  kernel_h, kernel_w, _, out_channels = weight.shape
  batch, height, width, _ = x.shape
  out_h = output_size(height, kernel_h, strides[0], pads[0])
  out_w = output_size(width, kernel_w, strides[1], pads[1])
  patches = _patch_matrix(x, (kernel_h, kernel_w), strides, pads)
  # A 2D [N*H'*W', K] x [K, C_out] matmul: its weight gradient is then a
  # transposed-LHS matmul, which XLA:CPU runs faster than the 4D
  # dot_general (contracting N, H', W') that autodiff of a 4D form gives.
  out = jnp.matmul(patches, weight.reshape(patches.shape[1], out_channels))
  return out.reshape(batch, out_h, out_w, out_channels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_cpu_gradients(x, weight, strides, pads):
  return _lax_conv(x, weight, strides, pads)


def _conv_cpu_gradients_fwd(x, weight, strides, pads):
  return _lax_conv(x, weight, strides, pads), (x, weight)


def _gradient_pads(in_size, out_size, kernel, stride, pads):
  """Pads of one spatial axis for the two gradient convolutions.

  Returns (weight-gradient pads, input-gradient pads): the forward pass used
  pads[0] before and `used_after` after the input (the stride may leave
  trailing input unused, i.e. a negative pad).
  """
  used_after = kernel + (out_size - 1) * stride - in_size - pads[0]
  before = kernel - 1 - pads[0]
  after = in_size + kernel - 1 - ((out_size - 1) * stride + 1) - before
  return (pads[0], used_after), (before, after)


def _canonical_gradients(x, weight, strides, pads, out_grad):
  """(input gradient, weight gradient) of the ungrouped NHWC/HWIO conv as
  two convolutions in the forward's own NHWC/HWIO form.

  XLA:CPU runs the weight-gradient convolution jax's autodiff emits
  (batch and feature roles swapped) with a fast kernel only after its
  layout pass makes it canonical, which it cannot do inside a loop body: in
  a lax.scan such a 3x3 weight gradient ran far slower. Writing the
  transposes out keeps every convolution canonical wherever it runs.
  """
  kernel = weight.shape[:2]
  axes = [_gradient_pads(x.shape[1 + a], out_grad.shape[1 + a], kernel[a],
                         strides[a], pads[a]) for a in range(2)]
  # dW[i, j, c, o] = sum_{n, y, x} x_pad[n, y*s + i, x*s + j, c] dy[n, y, x, o]:
  # a convolution with x's channels as its batch and N contracted.
  weight_grad = jax.lax.conv_general_dilated(
      jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(out_grad, (1, 2, 0, 3)),
      window_strides=(1, 1), padding=[a[0] for a in axes],
      rhs_dilation=strides, dimension_numbers=DIMENSION_NUMBERS)
  weight_grad = jnp.transpose(weight_grad, (1, 2, 0, 3))
  # dx: dy dilated by the stride, correlated with the flipped kernel.
  flipped = jnp.transpose(jnp.flip(weight, (0, 1)), (0, 1, 3, 2))
  x_grad = jax.lax.conv_general_dilated(
      out_grad, flipped, window_strides=(1, 1), padding=[a[1] for a in axes],
      lhs_dilation=strides, dimension_numbers=DIMENSION_NUMBERS)
  return x_grad, weight_grad


def _conv_cpu_gradients_bwd(strides, pads, residuals, out_grad):
  x, weight = residuals
  if weight.shape[0] * weight.shape[1] != 1:
    return _canonical_gradients(x, weight, strides, pads, out_grad)
  # A 1x1 conv is patches @ W: both gradients are matmuls, the input's
  # spread back by the transpose of the patch extraction (for a stride, an
  # interior pad: cheaper than XLA's lhs-dilated convolution).
  patches, patches_vjp = jax.vjp(
      lambda x: _patch_matrix(x, weight.shape[:2], strides, pads), x)
  out_grad = out_grad.reshape(patches.shape[0], -1)
  kernel = weight.reshape(patches.shape[1], -1)
  (x_grad,) = patches_vjp(jnp.matmul(out_grad, kernel.T))
  weight_grad = jnp.matmul(patches.T, out_grad)
  return x_grad, weight_grad.reshape(weight.shape)


_conv_cpu_gradients.defvjp(_conv_cpu_gradients_fwd, _conv_cpu_gradients_bwd)


def conv_cpu_gradients(x: jax.Array, weight: jax.Array,
                       stride: int | Sequence[int] = 1,
                       padding: Padding = 'SAME') -> jax.Array:
  """`lax.conv_general_dilated` with a backward pass XLA:CPU runs fast.

  The forward pass is XLA's. 1x1 kernels ('lax_matmul_grads'): the
  weight gradient is one matmul, patch_matrix(x)^T @ out_grad, instead of
  XLA:CPU's weight-gradient convolution, slower on large maps; the
  input gradient is out_grad @ W^T through the transpose of the patch
  extraction (an interior pad when strided). Larger kernels
  ('lax_canonical_grads'): both gradients as canonical convolutions
  (_canonical_gradients). A custom VJP: reverse mode only (jax.jvp of it
  raises). Args and result as `im2col_conv2d` (ungrouped).
  """
  strides, pads = _validate(x.shape, weight.shape, stride, padding, 1)
  x, weight = match_varying(x, weight)
  return _conv_cpu_gradients(x, weight, strides,
                             tuple(tuple(p) for p in pads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _grouped_conv_cpu_gradients(x, weight, strides, pads, groups):
  return _lax_conv(x, weight, strides, pads, groups)


def _grouped_conv_cpu_gradients_fwd(x, weight, strides, pads, groups):
  return _lax_conv(x, weight, strides, pads, groups), (x, weight)


def _grouped_conv_cpu_gradients_bwd(strides, pads, groups, residuals,
                                    out_grad):
  x, weight = residuals
  kernel_h, kernel_w, group_in, out_channels = weight.shape
  _, input_vjp = jax.vjp(
      lambda x: _lax_conv(x, weight, strides, pads, groups), x)
  (x_grad,) = input_vjp(out_grad)
  # dW[i, j, c, g * C_out/G + o] = sum over output pixels m of
  # window_(i, j)[m, g * C_in/G + c] * dy[m, g * C_out/G + o].
  windows = strided_windows(x, (kernel_h, kernel_w), strides, pads)
  patches = jnp.stack(windows, axis=3).reshape(
      -1, kernel_h * kernel_w, groups, group_in)
  out_grad = out_grad.reshape(patches.shape[0], groups, -1)
  weight_grad = jnp.einsum('mkgc,mgo->kcgo', patches, out_grad)
  return x_grad, weight_grad.reshape(weight.shape)


_grouped_conv_cpu_gradients.defvjp(_grouped_conv_cpu_gradients_fwd,
                                   _grouped_conv_cpu_gradients_bwd)


def grouped_conv_cpu_gradients(x: jax.Array, weight: jax.Array,
                               stride: int | Sequence[int] = 1,
                               padding: Padding = 'SAME',
                               feature_group_count: int = 1) -> jax.Array:
  """`lax.conv_general_dilated` with feature_group_count, and a weight
  gradient XLA:CPU runs fast: one matmul batched over the groups (module
  docstring). Forward and input gradient are XLA's. A custom VJP: reverse
  mode only. Args and result as `conv2d`.
  """
  strides, pads = _validate(x.shape, weight.shape, stride, padding,
                            feature_group_count)
  x, weight = match_varying(x, weight)
  return _grouped_conv_cpu_gradients(x, weight, strides,
                                     tuple(tuple(p) for p in pads),
                                     feature_group_count)


def _varying_axes(value: jax.Array) -> frozenset:
  """Mesh axes (inside shard_map) along which value differs per device."""
  manual_axis_type = getattr(jax.typeof(value), 'manual_axis_type', None)
  return frozenset(getattr(manual_axis_type, 'varying', ()))


def match_varying(*values: jax.Array) -> tuple[jax.Array, ...]:
  """The values, each cast to vary over every mesh axis any of them varies
  over (inside shard_map; unchanged outside).

  Call it on the inputs of a custom VJP: where a replicated parameter meets
  per-device activations, autodiff psums the parameter's gradient over the
  mesh (the transpose of the implicit pvary), and a custom VJP needs the
  parameter already varying for that.
  """
  axes = [_varying_axes(v) for v in values]
  union = frozenset().union(*axes)
  return tuple(
      jax.lax.pcast(v, tuple(sorted(union - a)), to='varying')
      if union - a else v for v, a in zip(values, axes))


def conv2d(x: jax.Array, weight: jax.Array, stride: int | Sequence[int] = 1,
           padding: Padding = 'SAME', feature_group_count: int = 1
           ) -> jax.Array:
  """2D convolution, NHWC input, HWIO kernel, NHWC output.

  Args:
    x: [N, H, W, C_in].
    weight: [kh, kw, C_in / feature_group_count, C_out], same dtype as x.
    stride: int or (stride_h, stride_w).
    padding: 'SAME', 'VALID', 'SAME_LOWER' or [(lo, hi), (lo, hi)] pixels.
    feature_group_count: number of channel groups (1 = ordinary conv).

  Returns:
    [N, H', W', C_out] in x's dtype, computed as `choose_implementation`
    says (module docstring); equal to `nfnets.layers.conv2d` up to float32
    rounding.
  """
  strides, pads = _validate(x.shape, weight.shape, stride, padding,
                            feature_group_count)
  implementation = choose_implementation(x.shape, weight.shape, strides, pads,
                                         feature_group_count)
  if implementation == 'im2col':
    return im2col_conv2d(x, weight, strides, pads)
  if implementation in ('lax_matmul_grads', 'lax_canonical_grads'):
    return conv_cpu_gradients(x, weight, strides, pads)
  if implementation == 'lax_grouped_matmul_weight_grad':
    return grouped_conv_cpu_gradients(x, weight, strides, pads,
                                      feature_group_count)
  return _lax_conv(x, weight, strides, pads, feature_group_count)

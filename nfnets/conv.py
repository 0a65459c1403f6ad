"""The one 2D convolution (NHWC x HWIO -> NHWC) behind every conv layer.

On GPU and TPU this is always `jax.lax.conv_general_dilated`. On CPU, XLA's
convolutions are slow for some shapes (measured with jax 0.10.2 on a 2-core
x86 machine; see benchmarks/conv_shapes.py): convolutions whose output map is
tiny (stage 4 of a ResNet-50 at 64 px has 2x2 maps) run at 2-3 GFLOP/s,
against 100+ GFLOP/s for a matmul. There, `conv2d` computes the same
convolution as im2col: the kh * kw shifted (strided) windows of the padded
input are concatenated along channels and multiplied with the reshaped kernel
in one dot. Autodiff of that graph gives the input gradient as pads + adds of
dot outputs and the weight gradient as one dot, both fast at these sizes.
Gradients are exact (the same sums, in a different order).

Which implementation runs:
  * `NFNETS_CONV_IMPL=plain` (environment, read once at first use): always
    `lax.conv_general_dilated`, on every backend.
  * `NFNETS_CONV_IMPL=auto` (the default): `lax.conv_general_dilated` unless
    the default backend (`jax.default_backend()` when the convolution is
    traced) is CPU, the convolution is ungrouped, its kernel is larger than
    1x1 and its output map has at most MAX_IM2COL_OUTPUT_PIXELS pixels
    (`uses_im2col`): the shapes where im2col was measured faster.
"""

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp

IMPL_ENV_VAR = 'NFNETS_CONV_IMPL'
IMPLS = ('auto', 'plain')
DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')

# On CPU, a conv with a kernel larger than 1x1 runs as im2col when its output
# map has at most this many pixels (out_h * out_w). NF-ResNet-50 shapes,
# batch 32, jax 0.10.2 with the YNN flag, 2-core x86 (ms, forward / backward,
# plain -> im2col; benchmarks/conv_shapes.py):
#   3x3 512->512 at 2x2 out:      621 -> 9 / 604 -> 16
#   3x3 512->512 /2, 2x2 out:     8.7 -> 8.1 / 773 -> 16
#   3x3 256->256 at 4x4 out:      6.9 -> 8.4 / 17.5 -> 17.0 (no gain)
#   3x3 128->128 at 8x8 out:      7.7 -> 9.8 / 16.2 -> 23.5 (loss)
# 1x1 convs as a dot were within noise of the plain conv at every size
# (they stay plain); 3x3 convs with large maps are several times slower as
# im2col (building the patches dominates), and so is the 7x7 stem.
MAX_IM2COL_OUTPUT_PIXELS = 4

Padding = str | Sequence[tuple[int, int]]


@functools.cache
def configured_impl() -> str:
  """The implementation asked for by NFNETS_CONV_IMPL ('auto' if unset).

  Read once per process (cached), so set it before the first convolution is
  traced. Raises ValueError for any other value.
  """
  value = os.environ.get(IMPL_ENV_VAR, 'auto').strip().lower() or 'auto'
  if value not in IMPLS:
    raise ValueError(f'{IMPL_ENV_VAR}={os.environ[IMPL_ENV_VAR]!r} is not '
                     f'allowed; use one of {IMPLS}.')
  return value


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
    raise ValueError(f'stride must be a positive int or a pair of them, got '
                     f'{stride!r}.')
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


def uses_im2col(x_shape: Sequence[int], weight_shape: Sequence[int],
                stride: int | Sequence[int] = 1, padding: Padding = 'SAME',
                feature_group_count: int = 1,
                backend: str | None = None) -> bool:
  """Whether `conv2d` computes this convolution as im2col + dot.

  Args:
    x_shape: [N, H, W, C_in].
    weight_shape: [kh, kw, C_in / groups, C_out].
    stride, padding, feature_group_count: as for `conv2d`.
    backend: platform name; default `jax.default_backend()`.
  """
  strides, pads = _validate(x_shape, weight_shape, stride, padding,
                            feature_group_count)
  if configured_impl() == 'plain' or feature_group_count != 1:
    return False
  if (backend or jax.default_backend()) != 'cpu':
    return False
  if weight_shape[0] * weight_shape[1] == 1:
    return False
  out_h, out_w = (output_size(x_shape[1 + a], weight_shape[a], strides[a],
                              pads[a]) for a in range(2))
  return out_h * out_w <= MAX_IM2COL_OUTPUT_PIXELS


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
    dimension numbers up to float rounding. The patch tensor it builds is
    kh * kw times the size of the output map times C_in.
  """
  (stride_h, stride_w), pads = _validate(x.shape, weight.shape, stride,
                                         padding, 1)
  kernel_h, kernel_w, in_channels, out_channels = weight.shape
  batch, height, width, _ = x.shape
  out_h = output_size(height, kernel_h, stride_h, pads[0])
  out_w = output_size(width, kernel_w, stride_w, pads[1])
  if any(p != 0 for pair in pads for p in pair):
    # lax.pad (unlike jnp.pad) also takes negative (cropping) pads.
    x = jax.lax.pad(x, jnp.zeros((), x.dtype),
                    [(0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)])
  windows = [
      jax.lax.slice(x, (0, i, j, 0),
                    (batch, i + (out_h - 1) * stride_h + 1,
                     j + (out_w - 1) * stride_w + 1, in_channels),
                    (1, stride_h, stride_w, 1))
      for i in range(kernel_h) for j in range(kernel_w)]
  # Channel index (i * kw + j) * C_in + c matches the HWIO kernel reshaped.
  patches = windows[0] if len(windows) == 1 else jnp.concatenate(windows, -1)
  kernel = weight.reshape(kernel_h * kernel_w * in_channels, out_channels)
  return jax.lax.dot_general(patches, kernel, (((3,), (0,)), ((), ())))


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
    [N, H', W', C_out] in x's dtype. im2col + dot on CPU for the shapes
    `uses_im2col` names, `lax.conv_general_dilated` otherwise (module
    docstring).
  """
  strides, pads = _validate(x.shape, weight.shape, stride, padding,
                            feature_group_count)
  if uses_im2col(x.shape, weight.shape, strides, pads, feature_group_count):
    return im2col_conv2d(x, weight, strides, pads)
  return jax.lax.conv_general_dilated(
      x, weight, window_strides=strides, padding=pads,
      dimension_numbers=DIMENSION_NUMBERS,
      feature_group_count=feature_group_count)

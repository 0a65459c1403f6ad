"""Per-convolution CPU timing of a model: plain lax conv vs im2col + dot.

Traces the model's training forward pass, collects every convolution (shape,
kernel, stride, padding, how many times it runs per step, counting scanned
blocks), then times each distinct one alone, jitted, as forward only and as
backward only (gradients wrt input and kernel for a given output cotangent;
a train step runs both), with
`lax.conv_general_dilated` and with `nfnets.conv.im2col_conv2d`. Prints one
row per shape (ms per call, median of --reps calls after a warm-up) and the
per-step totals, which say where a train step's convolution time goes and
which shapes the im2col rule in nfnets/conv.py should take.

  python benchmarks/conv_shapes.py --config=nf_resnet50 --image_size=64 \
      --batch=32 --reps=5
"""

import collections
import importlib
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..'))
from nfnets import conv  # pylint: disable=g-import-not-at-top
from nfnets import models  # pylint: disable=g-import-not-at-top

_CONFIG = flags.DEFINE_string('config', 'nf_resnet50', 'Config under configs/.')
_SIZE = flags.DEFINE_integer('image_size', 64, 'Image size, px.')
_BATCH = flags.DEFINE_integer('batch', 32, 'Batch size.')
_REPS = flags.DEFINE_integer('reps', 5, 'Timed calls per case (median).')
_MODES = flags.DEFINE_list('modes', ['forward', 'backward'],
                           'forward and/or backward (both gradients).')
_IMPLS = flags.DEFINE_list('impls', ['plain', 'im2col'],
                           'plain and/or im2col.')

ConvShape = collections.namedtuple(
    'ConvShape', 'x_shape w_shape strides padding groups')


def model_convolutions(config, image_size: int, batch: int) -> dict:
  """{ConvShape: times run per forward pass} from the traced model."""
  model = models.build(config.model)
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3),
                                jnp.float32)
  rng = jax.random.key(0)
  params, state = jax.eval_shape(
      lambda r, x: model.init(r, x, is_training=True), rng, images)
  jaxpr = jax.make_jaxpr(
      lambda p, s, r, x: model.apply(p, s, r, x, is_training=True))(
          params, state, rng, images)
  counts = collections.Counter()

  def visit(jaxpr, multiplicity):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        lhs, rhs = (v.aval for v in eqn.invars)
        counts[ConvShape(tuple(lhs.shape), tuple(rhs.shape),
                         tuple(eqn.params['window_strides']),
                         tuple(tuple(p) for p in eqn.params['padding']),
                         eqn.params['feature_group_count'])] += multiplicity
      inner = multiplicity * eqn.params.get('length', 1)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub, inner)

  visit(jaxpr.jaxpr, 1)
  return counts


def _conv_fn(shape: ConvShape, impl: str):
  if impl == 'im2col':
    return lambda x, w: conv.im2col_conv2d(x, w, shape.strides,
                                           list(shape.padding))
  return lambda x, w: jax.lax.conv_general_dilated(
      x, w, shape.strides, list(shape.padding),
      dimension_numbers=conv.DIMENSION_NUMBERS,
      feature_group_count=shape.groups)


def time_case(shape: ConvShape, impl: str, mode: str, reps: int) -> float:
  """Median seconds of one jitted call."""
  fn = _conv_fn(shape, impl)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape.x_shape, dtype=np.float32))
  w = jnp.asarray(rng.standard_normal(shape.w_shape, dtype=np.float32))
  if mode == 'forward':
    step = jax.jit(fn)
  else:
    out_shape = jax.eval_shape(fn, x, w).shape
    cotangent = jnp.asarray(rng.standard_normal(out_shape, dtype=np.float32))
    # Backward only: the gradient of a linear map needs no forward value.
    step = jax.jit(jax.grad(lambda x, w: jnp.vdot(fn(x, w), cotangent),
                            argnums=(0, 1)))
  jax.block_until_ready(step(x, w))
  seconds = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(step(x, w))
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)


def main(argv):
  del argv
  for mode in _MODES.value:
    if mode not in ('forward', 'backward'):
      raise app.UsageError(f'--modes: unknown {mode!r}; allowed: forward, '
                           'backward.')
  for impl in _IMPLS.value:
    if impl not in ('plain', 'im2col'):
      raise app.UsageError(f'--impls: unknown {impl!r}; allowed: plain, '
                           'im2col.')
  config = importlib.import_module(f'configs.{_CONFIG.value}').get_config()
  counts = model_convolutions(config, _SIZE.value, _BATCH.value)
  print(f'{_CONFIG.value}, {_SIZE.value} px, batch {_BATCH.value}, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; ms per call '
        f'(median of {_REPS.value}); backward = grads wrt x and w (the '
        'forward is not recomputed: a conv is linear)')
  columns = [(m, i) for m in _MODES.value for i in _IMPLS.value]
  print('| x shape | kernel | stride | out | runs/step | GFLOP/run | '
        + ' | '.join(f'{m} {i}' for m, i in columns) + ' |')
  totals = collections.Counter()
  for shape, count in counts.items():
    pads = shape.padding
    out = tuple(conv.output_size(shape.x_shape[1 + a], shape.w_shape[a],
                                 shape.strides[a], pads[a]) for a in range(2))
    flop = (2 * shape.x_shape[0] * out[0] * out[1] * np.prod(shape.w_shape))
    cells = []
    for mode, impl in columns:
      if impl == 'im2col' and shape.groups != 1:
        cells.append('-')
        continue
      seconds = time_case(shape, impl, mode, _REPS.value)
      totals[mode, impl] += seconds * count
      cells.append(f'{seconds * 1e3:.1f}')
    print(f'| {shape.x_shape} | {shape.w_shape[:2]} {shape.w_shape[2]}->'
          f'{shape.w_shape[3]} | {shape.strides[0]} | {out[0]}x{out[1]} | '
          f'{count} | {flop / 1e9:.2f} | ' + ' | '.join(cells) + ' |',
          flush=True)
  print('per step, ms: ' + ', '.join(
      f'{m} {i} {totals[m, i] * 1e3:.0f}' for m, i in columns))


if __name__ == '__main__':
  app.run(main)

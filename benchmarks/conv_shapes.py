"""Per-convolution CPU timing of a model: lax conv vs nfnets/cpu/conv.py rewrites.

Traces the model's training forward pass, collects every convolution (shape,
kernel, stride, padding, how many times it runs per step, counting scanned
blocks), then times each distinct one alone, jitted, as forward only and as
backward only (gradients wrt input and kernel for a given output cotangent;
a train step runs both), with `lax.conv_general_dilated` (plain),
`nfnets.cpu.conv.im2col_conv2d` (im2col) and `nfnets.cpu.conv.conv2d` as
NFNETS_CONV_IMPL=auto chooses (auto). Prints one
row per shape (ms per call, median of --reps calls after a warm-up) and the
per-step totals, which say where a train step's convolution time goes and
which shapes the im2col rule in nfnets/cpu/conv.py should take.

With --step_rounds=N it then times the whole train step (experiment.Experiment,
as benchmarks/train_step.py) and the eval-mode forward pass with
NFNETS_CONV_IMPL=plain and =auto alternately in this one process (N rounds,
order flipped each round), which cancels most of the drift of a shared
machine; --reps=0 skips the per-shape table.

  python -m benchmarks.conv_shapes --config=nf_resnet50 --image_size=64 \
      --batch=32 --reps=5 --step_rounds=5
"""

import collections
import contextlib
import os
import statistics

from absl import flags
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from nfnets import cli
from nfnets import errors
from nfnets import models
from nfnets import ops
from nfnets.cpu import conv

_CONFIG = flags.DEFINE_string('config', 'nf_resnet50', 'Config under configs/.')
_SIZE = flags.DEFINE_integer('image_size', 64, 'Image size, px.')
_BATCH = flags.DEFINE_integer('batch', 32, 'Batch size.')
_REPS = flags.DEFINE_integer('reps', 5, 'Timed calls per case (median).')
_MODES = flags.DEFINE_list('modes', ['forward', 'backward'],
                           'forward and/or backward (both gradients).')
_IMPLS = flags.DEFINE_list(
    'impls', ['plain', 'im2col', 'auto'],
    'Any of plain (lax conv), im2col (im2col_conv2d), auto (conv2d as '
    'NFNETS_CONV_IMPL=auto chooses).')
_STEP_ROUNDS = flags.DEFINE_integer(
    'step_rounds', 0, 'Alternating rounds of whole train step / forward with '
    'NFNETS_CONV_IMPL=plain vs auto (0: skip).')
_STEPS = flags.DEFINE_integer('steps', 2, 'Steps per timed step measurement.')

ConvShape = collections.namedtuple(
    'ConvShape', 'x_shape w_shape strides padding groups')


@contextlib.contextmanager
def _conv_impl(impl: str):
  """NFNETS_CONV_IMPL=impl for what is traced inside; then the user's
  setting again."""
  user_setting = os.environ.get(ops.IMPL_ENV_VAR)
  os.environ[ops.IMPL_ENV_VAR] = impl
  ops.configured_impl.cache_clear()  # read again at the next trace
  try:
    yield
  finally:
    if user_setting is None:
      os.environ.pop(ops.IMPL_ENV_VAR, None)
    else:
      os.environ[ops.IMPL_ENV_VAR] = user_setting
    ops.configured_impl.cache_clear()


def model_convolutions(config, image_size: int, batch: int) -> dict:
  """{ConvShape: times run per forward pass} from the traced model (traced
  with NFNETS_CONV_IMPL=plain, so that every convolution shows up as one)."""
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3),
                                jnp.float32)
  rng = jax.random.key(0)
  with _conv_impl('plain'):
    model = models.build(config.model)
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
  if impl == 'auto':  # what conv.conv2d chooses (NFNETS_CONV_IMPL=auto)
    return lambda x, w: conv.conv2d(x, w, shape.strides, list(shape.padding),
                                    shape.groups)
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
  return statistics.median(harness.time_calls(lambda: step(x, w), 1)
                           for _ in range(reps))


def compare_steps(config, rounds: int, steps: int) -> None:
  """Prints train step and forward images/s, plain vs auto, alternated;
  config as made by harness.fake_config."""
  cases = {}
  for impl in ('plain', 'auto'):
    with _conv_impl(impl):  # the jitted functions are traced (and fixed) here
      cases[impl] = harness.TrainStep(config, forward=True)
      cases[impl].train(1)
      cases[impl].forward(1)
  batch, image_size = config.train.batch_size, config.data.image_size
  rates = harness.alternate(
      rounds, ('train', 'forward'), ('plain', 'auto'),
      lambda mode, impl: batch * steps / getattr(cases[impl], mode)(steps))
  medians = harness.medians(rates)
  for mode in ('train', 'forward'):
    plain, auto = medians[mode, 'plain'], medians[mode, 'auto']
    print(f'{mode} {image_size} px, batch {batch}: images/s median of '
          f'{rounds} rounds x {steps} steps: plain {plain:.2f}, auto '
          f'{auto:.2f} (x{auto / plain:.2f}); best round plain '
          f'{max(rates[mode, "plain"]):.2f}, auto '
          f'{max(rates[mode, "auto"]):.2f}', flush=True)


def main(argv):
  del argv
  for mode in _MODES.value:
    if mode not in ('forward', 'backward'):
      raise errors.UserError(f'--modes: unknown {mode!r}; allowed: forward, '
                             'backward.')
  for impl in _IMPLS.value:
    if impl not in ('plain', 'im2col', 'auto'):
      raise errors.UserError(f'--impls: unknown {impl!r}; allowed: plain, '
                             'im2col, auto.')
  config = harness.load_config(_CONFIG.value)
  try:
    models.check_image_size(config.model, _SIZE.value)
  except ValueError as e:
    raise errors.UserError(str(e)) from None
  if _STEP_ROUNDS.value > 0:  # before any compilation
    if _STEPS.value < 1:
      raise errors.UserError(f'--steps must be >= 1, got {_STEPS.value}.')
    step_config = harness.fake_config(config, _BATCH.value, _SIZE.value)
  if _REPS.value > 0:
    conv_table(config)
  if _STEP_ROUNDS.value > 0:
    compare_steps(step_config, _STEP_ROUNDS.value, _STEPS.value)


def conv_table(config) -> None:
  """Prints the per-shape table and per-step totals."""
  counts = model_convolutions(config, _SIZE.value, _BATCH.value)
  print(f'{_CONFIG.value}, {_SIZE.value} px, batch {_BATCH.value}, '
        f'XLA_FLAGS={harness.xla_flags()}; ms per call '
        f'(median of {_REPS.value}); backward = grads wrt x and w (the '
        'forward is not recomputed: a conv is linear)')
  columns = [(m, i) for m in _MODES.value for i in _IMPLS.value]
  print(harness.markdown_table(
      ['x shape', 'kernel', 'stride', 'out', 'runs/step', 'GFLOP/run']
      + [f'{m} {i}' for m, i in columns]))
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
    print(harness.table_row(
        [shape.x_shape, f'{shape.w_shape[:2]} {shape.w_shape[2]}->'
         f'{shape.w_shape[3]}', shape.strides[0], f'{out[0]}x{out[1]}',
         count, f'{flop / 1e9:.2f}'] + cells), flush=True)
  print('per step, ms: ' + ', '.join(
      f'{m} {i} {totals[m, i] * 1e3:.0f}' for m, i in columns))


if __name__ == '__main__':
  cli.run(main)

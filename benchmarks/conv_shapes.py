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

  python benchmarks/conv_shapes.py --config=nf_resnet50 --image_size=64 \
      --batch=32 --reps=5 --step_rounds=5
"""

import collections
import os
import statistics
import sys
import time

from absl import flags
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..'))
import experiment  # pylint: disable=g-import-not-at-top
import train_loop  # pylint: disable=g-import-not-at-top
from nfnets import cli  # pylint: disable=g-import-not-at-top
from nfnets import ops  # pylint: disable=g-import-not-at-top
from nfnets.cpu import conv  # pylint: disable=g-import-not-at-top
from nfnets import errors  # pylint: disable=g-import-not-at-top
from nfnets import models  # pylint: disable=g-import-not-at-top

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


def model_convolutions(config, image_size: int, batch: int) -> dict:
  """{ConvShape: times run per forward pass} from the traced model (traced
  with NFNETS_CONV_IMPL=plain, so that every convolution shows up as one)."""
  user_setting = os.environ.get(ops.IMPL_ENV_VAR)
  _set_impl('plain')
  try:
    return _model_convolutions(config, image_size, batch)
  finally:
    _restore_impl(user_setting)


def _model_convolutions(config, image_size: int, batch: int) -> dict:
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
  seconds = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(step(x, w))
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)


def _set_impl(impl: str) -> None:
  os.environ[ops.IMPL_ENV_VAR] = impl
  ops.configured_impl.cache_clear()  # read again at the next trace


def _restore_impl(user_setting: str | None) -> None:
  if user_setting is None:
    os.environ.pop(ops.IMPL_ENV_VAR, None)
  else:
    os.environ[ops.IMPL_ENV_VAR] = user_setting
  ops.configured_impl.cache_clear()


def _step_config(config, image_size: int, batch: int):
  """The config on fake data at this size and batch, float32."""
  config = config.copy_and_resolve_references()
  config.data.update(dict(name='fake', image_size=image_size, num_workers=0,
                          fake_train_size=batch, fake_eval_size=batch))
  config.train.update(dict(batch_size=batch, eval_batch_size=batch,
                           steps=1000))
  config.compute_dtype = 'float32'
  return config


def compare_steps(config, image_size: int, batch: int, rounds: int,
                  steps: int) -> None:
  """Prints train step and forward images/s, plain vs auto, alternated."""
  config = _step_config(config, image_size, batch)
  rng = np.random.default_rng(0)
  train_batch = {
      'images': rng.integers(0, 256, (batch, image_size, image_size, 3),
                             dtype=np.uint8),
      'labels': rng.integers(0, config.model.num_classes, (batch,),
                             dtype=np.int32)}
  images = jnp.asarray(rng.standard_normal(
      (batch, image_size, image_size, 3), dtype=np.float32))
  cases = {}
  user_setting = os.environ.get(ops.IMPL_ENV_VAR)
  for impl in ('plain', 'auto'):
    _set_impl(impl)  # the jitted functions are traced (and fixed) here
    exp = experiment.Experiment(config)
    state = exp.init_state()
    params = jax.tree.map(jnp.copy, (state['params'], state['bn_state']))
    forward = jax.jit(lambda p, s, x, exp=exp: exp.model.apply(
        p, s, None, x, is_training=False)[0])
    state, metrics = exp.train_step(state, train_batch)
    jax.block_until_ready((metrics, forward(*params, images)))
    cases[impl] = dict(exp=exp, state=state, params=params, forward=forward)
  _restore_impl(user_setting)

  def time_train(case):
    start = time.perf_counter()
    for _ in range(steps):
      case['state'], metrics = case['exp'].train_step(case['state'],
                                                      train_batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start

  def time_forward(case):
    start = time.perf_counter()
    for _ in range(steps):
      logits = case['forward'](*case['params'], images)
    jax.block_until_ready(logits)
    return time.perf_counter() - start

  rates = collections.defaultdict(list)
  for round_index in range(rounds):
    order = ('plain', 'auto') if round_index % 2 == 0 else ('auto', 'plain')
    for mode, timer in (('train', time_train), ('forward', time_forward)):
      for impl in order:
        rates[mode, impl].append(batch * steps / timer(cases[impl]))
  for mode in ('train', 'forward'):
    plain, auto = (statistics.median(rates[mode, i]) for i in ('plain',
                                                                 'auto'))
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
  config = train_loop.load_config(_CONFIG.value)
  try:
    models.check_image_size(config.model, _SIZE.value)
  except ValueError as e:
    raise errors.UserError(str(e)) from None
  if _STEP_ROUNDS.value > 0:  # before any compilation
    if _STEPS.value < 1:
      raise errors.UserError(f'--steps must be >= 1, got {_STEPS.value}.')
    experiment.validate_config(_step_config(config, _SIZE.value, _BATCH.value))
  if _REPS.value > 0:
    conv_table(config)
  if _STEP_ROUNDS.value > 0:
    compare_steps(config, _SIZE.value, _BATCH.value, _STEP_ROUNDS.value,
                  _STEPS.value)


def conv_table(config) -> None:
  """Prints the per-shape table and per-step totals."""
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
  cli.run(main)

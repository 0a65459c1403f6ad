"""Compile time and step time of deep ResNets, scanned against unrolled.

For each variant, builds the real experiment (jitted shard_map train step,
SGD + Nesterov) with model.block_loop 'unrolled' and 'scan' in turn and
times: the init (trace + compile + run), the ahead-of-time compilation of
the train step, and the median step over --steps steps on one fake batch
(after one untimed step).
The loops' steps are timed alternately (the order flipping every round),
so a busy machine slows both alike. The persistent compilation cache is
off, so every compile is real.

  python benchmarks/compile_time.py --variants=ResNet50,ResNet288,ResNet600 \
      --batch=8 --image_size=64 --steps=3
"""

import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import experiment  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import nf_resnet50  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import resnet  # pylint: disable=g-import-not-at-top,wrong-import-position

_VARIANTS = flags.DEFINE_list('variants', ['ResNet288', 'ResNet600'],
                              f'Keys of resnet.VARIANTS: {list(resnet.VARIANTS)}.')
_LOOPS = flags.DEFINE_list('loops', ['unrolled', 'scan'],
                           'model.block_loop values, timed in this order.')
_MODEL = flags.DEFINE_string('model', 'nf_resnet', f'One of {resnet.MODELS}.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Global batch size.')
_SIZE = flags.DEFINE_integer('image_size', 64, 'Image size, px.')
_STEPS = flags.DEFINE_integer('steps', 3,
                             'Timed steps per loop (after one untimed).')


def _config(variant: str, loop: str):
  config = nf_resnet50.get_config()
  config.model.update(dict(name=_MODEL.value, variant=variant,
                           block_loop=loop))
  config.data.update(dict(name='fake', image_size=_SIZE.value,
                          num_workers=0))
  config.train.update(dict(batch_size=_BATCH.value, steps=1000))
  return config


def _check_flags(num_devices: int) -> None:
  """Validates every config before anything is compiled."""
  if _STEPS.value < 1:
    raise errors.UserError(f'--steps must be >= 1, got {_STEPS.value}.')
  for loop in _LOOPS.value:
    if loop == 'auto' or loop not in resnet.BLOCK_LOOPS:
      raise errors.UserError(f'Unknown loop {loop!r} in --loops; allowed: '
                             "'unrolled', 'scan'.")
  for variant in _VARIANTS.value:
    try:
      experiment.validate_config(_config(variant, _LOOPS.value[0]),
                                 num_devices)
    except ValueError as e:
      raise errors.UserError(str(e)) from None


def _prepare(variant: str, loop: str) -> dict:
  """Seconds of init and train-step compilation, and a ready-to-run step."""
  config = _config(variant, loop)
  exp = experiment.Experiment(config)
  start = time.perf_counter()
  state = jax.block_until_ready(exp.init_state())
  init_seconds = time.perf_counter() - start
  accumulator = exp.new_accumulator()
  start = time.perf_counter()
  step_fn = exp.compile_loop_step(state, accumulator)
  compile_seconds = time.perf_counter() - start
  rng = np.random.default_rng(0)
  size, batch_size = _SIZE.value, _BATCH.value
  batch = exp.shard_batch({
      'images': rng.integers(0, 256, (batch_size, size, size, 3), np.uint8),
      'labels': rng.integers(0, 1000, (batch_size,), np.int32)})
  run = dict(state=state, accumulator=accumulator, steps=[])

  def step():
    run['state'], run['accumulator'], done = step_fn(
        run['state'], batch, run['accumulator'])
    done.block_until_ready()

  step()  # untimed
  return dict(init=init_seconds, compile=compile_seconds, step=step, run=run)


def measure(variant: str) -> dict:
  """{loop: {init, compile, step (median seconds), loss}}; the loops' steps
  are timed alternately, the order flipping every round."""
  prepared = {loop: _prepare(variant, loop) for loop in _LOOPS.value}
  order = list(_LOOPS.value)
  for _ in range(_STEPS.value):
    for loop in order:
      start = time.perf_counter()
      prepared[loop]['step']()
      prepared[loop]['run']['steps'].append(time.perf_counter() - start)
    order.reverse()
  results = {}
  for loop, entry in prepared.items():
    sums = jax.device_get(entry['run']['accumulator'])['sums']
    results[loop] = dict(init=entry['init'], compile=entry['compile'],
                         step=statistics.median(entry['run']['steps']),
                         loss=float(sums['loss']) / (_STEPS.value + 1))
  return results


def main(argv):
  del argv
  jax.config.update('jax_enable_compilation_cache', False)
  _check_flags(jax.device_count())
  print(f'{_MODEL.value}, batch {_BATCH.value}, {_SIZE.value} px, float32, '
        f'{jax.device_count()} {jax.devices()[0].platform} device(s), '
        f'{len(os.sched_getaffinity(0))} CPUs, XLA_FLAGS='
        f'{os.environ.get("XLA_FLAGS", "")!r}', flush=True)
  print('| variant | blocks | block_loop | init s | train-step compile s '
        '| step s | loss |\n|---|---|---|---|---|---|---|', flush=True)
  for variant in _VARIANTS.value:
    blocks = sum(resnet.VARIANTS[variant])
    for loop, result in measure(variant).items():
      print(f'| {variant} | {blocks} | {loop} | {result["init"]:.1f} | '
            f'{result["compile"]:.1f} | {result["step"]:.2f} | '
            f'{result["loss"]:.4f} |', flush=True)


if __name__ == '__main__':
  cli.run(main)

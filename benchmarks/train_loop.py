"""The real training loop against the train step alone: is the loop
input- or host-bound?

For each config, times (1) the compiled train step on one batch already on
the devices and (2) `experiment.train_and_evaluate` itself (data pipeline,
prefetch, transfer, step, logging) in a temporary workdir, whose logged
images/s exclude compilation, evaluation and checkpoints. Step, loop, step
are run in turn and the two step timings averaged, since machines drift.

  python benchmarks/train_loop.py                        # quickstart, CPU
  python benchmarks/train_loop.py --configs=nf_resnet50 --data=fake \
      --batch=256 --image_size=224 --steps=100           # on a GPU
"""

import importlib
import os
import sys
import tempfile
import time

from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import experiment  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import metric_writer  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIGS = flags.DEFINE_list('configs', ['quickstart'],
                             'Config modules under configs/.')
_DATA = flags.DEFINE_string('data', '', "'' = the config's data; 'fake' = "
                            'random uint8 images of --image_size.')
_BATCH = flags.DEFINE_integer('batch', 0, 'Global batch; 0 = the config\'s.')
_SIZE = flags.DEFINE_integer('image_size', 0, 'px; 0 = the config\'s.')
_STEPS = flags.DEFINE_integer('steps', 300, 'Timed steps per measurement.')
_WORKERS = flags.DEFINE_integer('num_workers', -1,
                                'grain workers; -1 = the config\'s.')


def _config(name: str):
  try:
    module = importlib.import_module(f'configs.{name}')
  except ModuleNotFoundError:
    raise errors.UserError(f'Unknown config {name!r}: no configs/{name}.py.'
                           ) from None
  config = module.get_config()
  if _DATA.value:
    config.data.name = _DATA.value
    config.data.fake_train_size = 1024
    config.data.fake_eval_size = 256
  if _SIZE.value:
    config.data.image_size = _SIZE.value
  if _BATCH.value:
    config.train.batch_size = _BATCH.value
    config.train.eval_batch_size = _BATCH.value
  if _WORKERS.value >= 0:
    config.data.num_workers = _WORKERS.value
  # Log 4 times; the first interval (pipeline warm-up) is not counted.
  steps = _STEPS.value
  config.train.update(dict(steps=steps + steps // 3, log_every_steps=steps // 3,
                           eval_every_steps=0, checkpoint_every_steps=10**9))
  experiment.validate_config(config)
  return config


def _step_images_per_second(config) -> float:
  exp = experiment.Experiment(config)
  state = exp.init_state()
  accumulator = exp.new_accumulator()
  step_fn = exp.compile_loop_step(state, accumulator)
  local = config.train.batch_size // jax.process_count()
  size = config.data.image_size
  rng = np.random.default_rng(0)
  batch = exp.shard_batch({
      'images': rng.integers(0, 256, (local, size, size, 3), dtype=np.uint8),
      'labels': rng.integers(0, config.data.num_classes, (local,),
                             dtype=np.int32)})
  for _ in range(3):
    state, accumulator, done = step_fn(state, batch, accumulator)
  done.block_until_ready()
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, accumulator, done = step_fn(state, batch, accumulator)
  done.block_until_ready()
  return _STEPS.value * config.train.batch_size / (time.perf_counter() - start)


def _loop_images_per_second(config) -> tuple[float, float]:
  with tempfile.TemporaryDirectory() as workdir:
    experiment.train_and_evaluate(config, os.path.join(workdir, 'run'),
                                  log=lambda _: None)
    rows = [r for r in metric_writer.read_metrics(os.path.join(workdir, 'run'))
            if r['kind'] == 'train'][1:]
  images = sum(r['images_per_second'] for r in rows) / len(rows)
  wait = sum(r['data_wait_fraction'] for r in rows) / len(rows)
  return images, wait


def main(argv):
  del argv
  configs = {name: _config(name) for name in _CONFIGS.value}
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind}; '
        f'{_STEPS.value} timed steps each; step, loop, step in turn')
  print(f'{"config":<14} {"batch":>5} {"px":>4} {"data":<8} {"workers":>7} '
        f'{"step img/s":>11} {"loop img/s":>11} {"ratio":>6} {"data wait":>9}')
  for name, config in configs.items():
    first = _step_images_per_second(config)
    loop, wait = _loop_images_per_second(config)
    second = _step_images_per_second(config)
    step = (first + second) / 2
    print(f'{name:<14} {config.train.batch_size:>5} '
          f'{config.data.image_size:>4} {config.data.name:<8} '
          f'{config.data.num_workers:>7} {step:>11,.0f} {loop:>11,.0f} '
          f'{loop / step:>6.2f} {100 * wait:>8.0f}%', flush=True)


if __name__ == '__main__':
  cli.run(main)

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

The functions are also used by benchmarks/gpu.py; this module defines its
flags only when run as a script.
"""

import dataclasses
import importlib
import os
import sys
import tempfile
import time
import types

from absl import flags
import jax
import numpy as np

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, _ROOT)
import experiment  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import metric_writer  # pylint: disable=g-import-not-at-top,wrong-import-position

# Step timings run this many untimed steps first.
WARMUP_STEPS = 3


def _config_names() -> list[str]:
  """configs/*.py that define get_config (read as text, not imported)."""
  folder = os.path.join(_ROOT, 'configs')
  names = []
  for file_name in sorted(os.listdir(folder)):
    if file_name.endswith('.py'):
      with open(os.path.join(folder, file_name), encoding='utf-8') as f:
        if 'def get_config(' in f.read():
          names.append(file_name[:-3])
  return names


def load_config(name: str):
  """configs/<name>.py's config; UserError if there is no such config."""
  try:
    module = importlib.import_module(f'configs.{name}')
  except ModuleNotFoundError as e:
    if e.name not in (f'configs.{name}', 'configs'):
      raise  # a module the config itself imports is missing
    module = None
  if not hasattr(module, 'get_config'):
    raise errors.UserError(f'Unknown config {name!r}; allowed: '
                           f'{", ".join(_config_names())}.')
  return module.get_config()


def set_loop_steps(config, steps: int) -> None:
  """Train steps + steps // 3, logging 4 times (the first interval, pipeline
  warm-up, is not counted), no evaluation or checkpoint before the end."""
  if steps < 3:
    raise errors.UserError(f'Loop steps must be >= 3 (4 log intervals), got '
                           f'{steps}.')
  config.train.update(dict(steps=steps + steps // 3, log_every_steps=steps // 3,
                           eval_every_steps=0, checkpoint_every_steps=10**9,
                           signal_stats_every_steps=0))


@dataclasses.dataclass
class StepTiming:
  images_per_second: float
  seconds_per_step: float
  steps: int                 # timed steps
  setup_seconds: float       # model, init and compilation
  mean_loss: float           # over warm-up and timed steps (a sanity check)


def time_train_step(config, steps: int,
                    max_seconds: float | None = None) -> StepTiming:
  """The loop's compiled train step on one random uint8 batch put on the
  devices once, so the rate is the devices' alone. With max_seconds, fewer
  timed steps (at least 1) when the warm-up says `steps` would take longer."""
  start = time.perf_counter()
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
  jax.block_until_ready(batch)
  setup_seconds = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(WARMUP_STEPS):
    state, accumulator, done = step_fn(state, batch, accumulator)
  done.block_until_ready()
  if max_seconds is not None:
    warmup_step = (time.perf_counter() - start) / WARMUP_STEPS
    steps = max(1, min(steps, int(max_seconds / warmup_step)))
  start = time.perf_counter()
  for _ in range(steps):
    state, accumulator, done = step_fn(state, batch, accumulator)
  done.block_until_ready()
  seconds = time.perf_counter() - start
  host = jax.device_get(accumulator)
  return StepTiming(
      images_per_second=steps * config.train.batch_size / seconds,
      seconds_per_step=seconds / steps, steps=steps,
      setup_seconds=setup_seconds,
      mean_loss=float(host['sums']['loss']) / max(int(host['count']), 1))


def loop_images_per_second(config) -> tuple[float, float]:
  """(images/s, data wait fraction) of train_and_evaluate, averaged over the
  logged intervals after the first; config as set by set_loop_steps."""
  with tempfile.TemporaryDirectory() as workdir:
    experiment.train_and_evaluate(config, os.path.join(workdir, 'run'),
                                  log=lambda _: None)
    rows = [r for r in metric_writer.read_metrics(os.path.join(workdir, 'run'))
            if r['kind'] == 'train'][1:]
  images = sum(r['images_per_second'] for r in rows) / len(rows)
  wait = sum(r['data_wait_fraction'] for r in rows) / len(rows)
  return images, wait


def _define_flags():
  return types.SimpleNamespace(
      configs=flags.DEFINE_list('configs', ['quickstart'],
                                'Config modules under configs/.'),
      data=flags.DEFINE_string('data', '', "'' = the config's data; 'fake' = "
                               'random uint8 images of --image_size.'),
      batch=flags.DEFINE_integer('batch', 0,
                                 'Global batch; 0 = the config\'s.'),
      image_size=flags.DEFINE_integer('image_size', 0,
                                      'px; 0 = the config\'s.'),
      steps=flags.DEFINE_integer('steps', 300, 'Timed steps per measurement.'),
      num_workers=flags.DEFINE_integer('num_workers', -1,
                                       'grain workers; -1 = the config\'s.'))


def _config(name: str, flag_values):
  config = load_config(name)
  if flag_values.data.value:
    config.data.name = flag_values.data.value
    config.data.fake_train_size = 1024
    config.data.fake_eval_size = 256
  if flag_values.image_size.value:
    config.data.image_size = flag_values.image_size.value
  if flag_values.batch.value:
    config.train.batch_size = flag_values.batch.value
    config.train.eval_batch_size = flag_values.batch.value
  if flag_values.num_workers.value >= 0:
    config.data.num_workers = flag_values.num_workers.value
  set_loop_steps(config, flag_values.steps.value)
  experiment.validate_config(config)
  return config


def main(flag_values):
  configs = {name: _config(name, flag_values)
             for name in flag_values.configs.value}
  steps = flag_values.steps.value
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind}; '
        f'{steps} timed steps each; step, loop, step in turn')
  print(f'{"config":<14} {"batch":>5} {"px":>4} {"data":<8} {"workers":>7} '
        f'{"step img/s":>11} {"loop img/s":>11} {"ratio":>6} {"data wait":>9}')
  for name, config in configs.items():
    first = time_train_step(config, steps).images_per_second
    loop, wait = loop_images_per_second(config)
    second = time_train_step(config, steps).images_per_second
    step = (first + second) / 2
    print(f'{name:<14} {config.train.batch_size:>5} '
          f'{config.data.image_size:>4} {config.data.name:<8} '
          f'{config.data.num_workers:>7} {step:>11,.0f} {loop:>11,.0f} '
          f'{loop / step:>6.2f} {100 * wait:>8.0f}%', flush=True)


if __name__ == '__main__':
  _FLAG_VALUES = _define_flags()
  cli.run(lambda argv: main(_FLAG_VALUES))

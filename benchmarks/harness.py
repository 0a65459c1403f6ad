"""What the benchmarks share: configs by name on fake data, an Experiment
with a random batch, timed steps, alternating rounds, markdown tables.

Steps are dispatched asynchronously, so every timing blocks on the last
result of its calls before reading the clock; a step's outputs feed the
next one and devices run calls in order, so the last result being ready
means every call is done.
"""

import collections
import dataclasses
import importlib
import os
import statistics
import tempfile
import time
from typing import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import experiment
from nfnets import errors
from nfnets import metric_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Untimed steps before a loop step timing.
WARMUP_STEPS = 3


def cpu_count() -> int:
  """The CPUs this process may run on."""
  return len(os.sched_getaffinity(0))


def xla_flags() -> str:
  return repr(os.environ.get('XLA_FLAGS', ''))


def config_names() -> list[str]:
  """configs/*.py that define get_config (read as text, not imported)."""
  folder = os.path.join(ROOT, 'configs')
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
                           f'{", ".join(config_names())}.')
  return module.get_config()


def fake_config(config, batch: int, image_size: int, dtype: str = 'float32'):
  """A copy of config on fake in-memory data (one batch of it: the timed
  steps reuse one random batch) at this batch, size and compute dtype,
  validated: UserError naming any bad value. The schedule is longer than
  any timing."""
  config = config.copy_and_resolve_references()
  config.data.update(dict(name='fake', image_size=image_size,
                          eval_image_size=0, num_workers=0,
                          fake_train_size=batch, fake_eval_size=batch))
  config.train.update(dict(batch_size=batch, eval_batch_size=batch,
                           steps=10**6))
  config.compute_dtype = dtype
  experiment.validate_config(config)
  return config


def random_batch(rng: np.random.Generator, batch: int, image_size: int,
                 num_classes: int) -> dict:
  """Uniform uint8 images and labels, in host memory."""
  return {'images': rng.integers(0, 256, (batch, image_size, image_size, 3),
                                 dtype=np.uint8),
          'labels': rng.integers(0, num_classes, (batch,), dtype=np.int32)}


def time_calls(call: Callable[[], object], steps: int,
               warmup: int = 0) -> float:
  """Seconds of `steps` calls of call(), after `warmup` untimed ones."""
  for _ in range(warmup):
    out = call()
  if warmup:
    jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(steps):
    out = call()
  jax.block_until_ready(out)
  return time.perf_counter() - start


class TrainStep:
  """Experiment.train_step (the jitted shard_map step) on one random uint8
  batch kept in host memory, so that the time is the step's alone; with
  forward=True also the model's eval-mode forward pass, jitted, on random
  float32 images on the device, with a copy of the initial parameters."""

  def __init__(self, config, seed: int = 0, forward: bool = False):
    self.exp = experiment.Experiment(config)
    self.state = self.exp.init_state()
    rng = np.random.default_rng(seed)
    size, batch = config.data.image_size, config.train.batch_size
    self.batch = random_batch(rng, batch, size, config.model.num_classes)
    if forward:  # a copy: train steps donate the state
      self.eval_params = jax.tree.map(
          jnp.copy, (self.state['params'], self.state['bn_state']))
      self.images = jax.device_put(rng.standard_normal(
          (batch, size, size, 3), dtype=np.float32))
      self._forward = jax.jit(lambda p, s, x: self.exp.model.apply(
          p, s, None, x, is_training=False)[0])

  def _train_once(self):
    self.state, metrics = self.exp.train_step(self.state, self.batch)
    return metrics

  def train(self, steps: int) -> float:
    """Seconds of `steps` train steps."""
    return time_calls(self._train_once, steps)

  def forward(self, steps: int) -> float:
    """Seconds of `steps` forward passes."""
    return time_calls(lambda: self._forward(*self.eval_params, self.images),
                      steps)


class LoopStep:
  """The training loop's compiled step (Experiment.compile_loop_step) on one
  random uint8 batch put on the devices once, so that its rate is the
  devices' alone; the seconds of init, of compilation and of the whole
  setup (model, init, compilation, batch)."""

  def __init__(self, config, seed: int = 0):
    start = time.perf_counter()
    self.exp = experiment.Experiment(config)
    init_start = time.perf_counter()
    self.state = jax.block_until_ready(self.exp.init_state())
    self.init_seconds = time.perf_counter() - init_start
    self.accumulator = self.exp.new_accumulator()
    compile_start = time.perf_counter()
    self._step = self.exp.compile_loop_step(self.state, self.accumulator)
    self.compile_seconds = time.perf_counter() - compile_start
    local = config.train.batch_size // jax.process_count()
    self.batch = jax.block_until_ready(self.exp.shard_batch(random_batch(
        np.random.default_rng(seed), local, config.data.image_size,
        config.model.num_classes)))
    self.setup_seconds = time.perf_counter() - start

  def step(self):
    """Runs one step; returns an output that is ready when it is done."""
    self.state, self.accumulator, done = self._step(
        self.state, self.batch, self.accumulator)
    return done

  def mean_loss(self) -> float:
    """Over every step run (a sanity check)."""
    host = jax.device_get(self.accumulator)
    return float(host['sums']['loss']) / max(int(host['count']), 1)


@dataclasses.dataclass
class StepTiming:
  images_per_second: float
  seconds_per_step: float
  steps: int                 # timed steps
  setup_seconds: float       # model, init and compilation
  mean_loss: float           # over warm-up and timed steps (a sanity check)


def time_loop_step(config, steps: int,
                   max_seconds: float | None = None) -> StepTiming:
  """LoopStep's rate over `steps` steps after WARMUP_STEPS untimed ones.
  With max_seconds, fewer timed steps (at least 1) when the warm-up says
  `steps` would take longer."""
  run = LoopStep(config)
  warmup = time_calls(run.step, WARMUP_STEPS)
  if max_seconds is not None:
    steps = max(1, min(steps, int(max_seconds / (warmup / WARMUP_STEPS))))
  seconds = time_calls(run.step, steps)
  return StepTiming(
      images_per_second=steps * config.train.batch_size / seconds,
      seconds_per_step=seconds / steps, steps=steps,
      setup_seconds=run.setup_seconds, mean_loss=run.mean_loss())


def set_loop_steps(config, steps: int) -> None:
  """Train steps + steps // 3, logging 4 times (the first interval, pipeline
  warm-up, is not counted), no evaluation or checkpoint before the end."""
  if steps < 3:
    raise errors.UserError(f'Loop steps must be >= 3 (4 log intervals), got '
                           f'{steps}.')
  config.train.update(dict(steps=steps + steps // 3, log_every_steps=steps // 3,
                           eval_every_steps=0, checkpoint_every_steps=10**9,
                           signal_stats_every_steps=0))


def loop_images_per_second(config) -> tuple[float, float]:
  """(images/s, data wait fraction) of experiment.train_and_evaluate (data
  pipeline, prefetch, transfer, step, logging) in a temporary workdir,
  averaged over the logged intervals after the first, which exclude
  compilation, evaluation and checkpoints; config as set by set_loop_steps."""
  with tempfile.TemporaryDirectory() as workdir:
    experiment.train_and_evaluate(config, os.path.join(workdir, 'run'),
                                  log=lambda _: None)
    rows = [r for r in metric_writer.read_metrics(os.path.join(workdir, 'run'))
            if r['kind'] == 'train'][1:]
  images = sum(r['images_per_second'] for r in rows) / len(rows)
  wait = sum(r['data_wait_fraction'] for r in rows) / len(rows)
  return images, wait


def alternate(rounds: int, cases: Sequence[Hashable],
              contestants: Sequence[Hashable],
              measure: Callable[[Hashable, Hashable], float],
              after_round: Callable[[int, dict], None] | None = None) -> dict:
  """{(case, contestant): [measure(case, contestant) per round]}.

  Every round measures each case once per contestant, the contestants in
  turn, their order flipping every round, so that a busy machine's drift
  slows all of them alike; after_round(round_index, values) follows each.
  """
  values = collections.defaultdict(list)
  for round_index in range(rounds):
    order = contestants[::-1] if round_index % 2 else contestants
    for case in cases:
      for contestant in order:
        values[case, contestant].append(measure(case, contestant))
    if after_round is not None:
      after_round(round_index, values)
  return values


def medians(values: dict) -> dict:
  return {key: statistics.median(v) for key, v in values.items()}


def table_row(cells) -> str:
  return '| ' + ' | '.join(str(cell) for cell in cells) + ' |'


def markdown_table(columns, rows=()) -> str:
  """A header of these columns and the rows (lists of cells) below it."""
  return '\n'.join([table_row(columns), '|---' * len(columns) + '|']
                   + [table_row(row) for row in rows])


def prepare_jpegs(root: str, images: int, num_val: int) -> tuple[str, int]:
  """ILSVRC2012-layout tars of generated natural-looking JPEGs
  (tests/imagenet_fixtures.py) under root, prepared as array_record by
  nfnets/prepare_imagenet.py: (the tfds data_dir, train images written)."""
  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds
  from nfnets import prepare_imagenet
  from tests import imagenet_fixtures
  # pylint: enable=g-import-not-at-top
  tfds.disable_progress_bar()  # its bars would fill the log
  per_class = max(1, images // len(imagenet_fixtures.SYNSETS))
  imagenet_fixtures.write_manual_dir(os.path.join(root, 'manual'),
                                     per_class=per_class, num_val=num_val)
  data_dir = os.path.join(root, 'data')
  prepare_imagenet.prepare(os.path.join(root, 'manual'), data_dir,
                           allow_subset=True)
  return data_dir, per_class * len(imagenet_fixtures.SYNSETS)

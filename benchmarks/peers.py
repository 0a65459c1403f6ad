"""This project's NF-ResNet-50 against timm's nf_resnet50, on this machine's CPU.

Train step (forward + backward + SGD step) and eval-mode forward pass,
float32, timed alternately in one invocation: every measurement of ours is
paired with one of timm's, the pair's order flips each round (ours, timm,
timm, ours, ...), and the table reports the medians over rounds in images/s
and their ratio ours/timm.

Ours runs through the real experiment.Experiment (the jitted shard_map train
step, SGD + Nesterov, weight decay, label smoothing, dropout and stochastic
depth from the config) on a fixed uint8 batch already in host memory; the
forward pass is the model's eval-mode apply, jitted. timm runs in its own
environment (.venv-peers, made by benchmarks/setup_peers.sh) as a long-lived
subprocess, benchmarks/peers_timm.py, driven over stdin/stdout, with the same
recipe, dropout and drop-path rates, and torch threads = the CPUs this
process may use.

Each timed measurement follows a pause (--settle_seconds) and untimed
warm-up steps (--warmup_steps) of the same side. After its measurement ours
gives back the host memory its CPU steps keep (nfnets/cpu/runtime.py): on a
VM, an idle process holding it made timm's steps 20-30% slower.

  bash benchmarks/setup_peers.sh        # once
  python benchmarks/peers.py --image_sizes=64,224 --batch=32 --rounds=5 \
      --steps=3
"""

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, _ROOT)
import experiment  # pylint: disable=g-import-not-at-top
import train_loop  # pylint: disable=g-import-not-at-top
from nfnets.cpu import runtime as cpu_runtime  # pylint: disable=g-import-not-at-top
from nfnets import errors  # pylint: disable=g-import-not-at-top
from nfnets import models  # pylint: disable=g-import-not-at-top

MODES = ('train', 'forward')

_CONFIG = flags.DEFINE_string('config', 'nf_resnet50',
                              'Config module under configs/ (ours).')
_TIMM_MODEL = flags.DEFINE_string('timm_model', 'nf_resnet50',
                                  'timm model name (the peer).')
_SIZES = flags.DEFINE_list('image_sizes', ['64', '224'], 'Image sizes, px.')
_MODES = flags.DEFINE_list('modes', list(MODES), f'Any of {MODES}.')
_BATCH = flags.DEFINE_integer('batch', 32, 'Batch size.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Alternating rounds; the table '
                               'shows medians over rounds.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Steps per timed measurement '
                              '(every case compiles first, untimed).')
_WARMUP = flags.DEFINE_integer(
    'warmup_steps', 1, 'Untimed steps right before each timed measurement, '
    'both sides: each is timed in its steady state (ours reuses the host '
    'memory it keeps between steps, which it gives back before the peer '
    'runs).')
_SETTLE = flags.DEFINE_float(
    'settle_seconds', 5.0, 'Pause before each timed measurement, so that '
    'the other side\'s worker threads (torch\'s OpenMP threads spin after '
    'each parallel region) are idle when the clock starts.')
_PEER_PYTHON = flags.DEFINE_string(
    'peer_python', os.path.join(_ROOT, '.venv-peers', 'bin', 'python'),
    'Python of the peer environment (benchmarks/setup_peers.sh makes it).')


def validate(config, sizes, modes, batch: int, rounds: int, steps: int,
             peer_python: str, settle_seconds: float = 0.0,
             warmup_steps: int = 0) -> None:
  """Every check that needs no compute; ValueError naming the bad value."""
  unknown = sorted(set(modes) - set(MODES))
  if unknown or not modes:
    raise ValueError(f'Unknown modes {unknown or modes}; allowed: {MODES}.')
  for name, value in (('batch', batch), ('rounds', rounds), ('steps', steps)):
    if value < 1:
      raise ValueError(f'--{name} must be >= 1, got {value}.')
  if settle_seconds < 0:
    raise ValueError(f'--settle_seconds must be >= 0, got {settle_seconds:g}.')
  if warmup_steps < 0:
    raise ValueError(f'--warmup_steps must be >= 0, got {warmup_steps}.')
  if batch % jax.device_count():
    raise ValueError(f'--batch {batch} is not divisible by the '
                     f'{jax.device_count()} devices; use a multiple of '
                     f'{jax.device_count()}.')
  for size in sizes:
    models.check_image_size(config.model, size)
  if not os.access(peer_python, os.X_OK):
    raise ValueError(f'--peer_python {peer_python} does not exist; create the '
                     'peer environment with: bash benchmarks/setup_peers.sh')


class Ours:
  """The project's model: one Experiment per image size, built lazily."""

  def __init__(self, config, batch: int):
    self.config, self.batch = config, batch
    self._cases = {}

  def _case(self, size: int) -> dict:
    if size not in self._cases:
      config = self.config.copy_and_resolve_references()
      config.data.update(dict(name='fake', image_size=size, num_workers=0,
                              fake_train_size=self.batch,
                              fake_eval_size=self.batch))
      config.train.update(dict(batch_size=self.batch,
                               eval_batch_size=self.batch, steps=1000))
      config.compute_dtype = 'float32'
      exp = experiment.Experiment(config)
      rng = np.random.default_rng(size)
      state = exp.init_state()
      eval_params = jax.tree.map(jnp.copy, (state['params'],
                                            state['bn_state']))
      self._cases[size] = dict(
          exp=exp, state=state, eval_params=eval_params,
          train_batch={
              'images': rng.integers(0, 256, (self.batch, size, size, 3),
                                     dtype=np.uint8),
              'labels': rng.integers(0, config.model.num_classes,
                                     (self.batch,), dtype=np.int32)},
          forward_images=jax.device_put(rng.standard_normal(
              (self.batch, size, size, 3), dtype=np.float32)),
          forward=jax.jit(lambda p, s, x, exp=exp: exp.model.apply(
              p, s, None, x, is_training=False)[0]))
    return self._cases[size]

  def parameters(self) -> int:
    size = next(iter(self._cases))
    params = self._cases[size]['eval_params'][0]
    return sum(leaf.size for leaf in jax.tree.leaves(params))

  def train(self, size: int, steps: int) -> float:
    case = self._case(size)
    exp, state, metrics = case['exp'], case['state'], None
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = exp.train_step(state, case['train_batch'])
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    case['state'] = state  # the old one was donated
    return seconds

  def forward(self, size: int, steps: int) -> float:
    case = self._case(size)
    params, bn_state = case['eval_params']
    start = time.perf_counter()
    for _ in range(steps):
      logits = case['forward'](params, bn_state, case['forward_images'])
    jax.block_until_ready(logits)
    return time.perf_counter() - start

  def hand_over(self) -> None:
    """Before the peer runs: gives back the host memory our steps keep
    (nfnets/cpu/runtime.py), which on a VM slowed the peer by 20-30%."""
    cpu_runtime.release_kept_memory()


class Peer:
  """benchmarks/peers_timm.py running in the peer environment."""

  def __init__(self, python: str, model: str, batch: int, threads: int,
               dropout_rate: float, drop_path_rate: float):
    self.process = subprocess.Popen(
        [python, os.path.join(_ROOT, 'benchmarks', 'peers_timm.py'),
         f'--model={model}', f'--batch={batch}', f'--threads={threads}',
         f'--dropout_rate={dropout_rate}',
         f'--drop_path_rate={drop_path_rate}'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    self.info = json.loads(self._reply('ready'))

  def _reply(self, expected: str) -> str:
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f'the timm process exited (code '
                         f'{self.process.wait()}); see its messages above')
    word, _, rest = line.strip().partition(' ')
    if word != expected:
      raise RuntimeError(f'timm process: {line.strip()}')
    return rest

  def _time(self, mode: str, size: int, steps: int) -> float:
    self.process.stdin.write(f'{mode} {size} {steps}\n')
    return float(self._reply('ok'))

  def train(self, size: int, steps: int) -> float:
    return self._time('train', size, steps)

  def forward(self, size: int, steps: int) -> float:
    return self._time('forward', size, steps)

  def hand_over(self) -> None:
    """Before our runs: nothing held (timm frees its step memory)."""

  def close(self) -> None:
    if self.process.poll() is None:
      self.process.stdin.write('quit\n')
      self.process.stdin.close()
      self.process.wait(timeout=60)


def table(rates: dict, cases, batch: int, model_name: str,
          timm_model: str) -> str:
  """Markdown table of median images/s; rates[(mode, size, who)] = list."""
  label = {'train': 'train step', 'forward': 'forward only'}
  lines = [f'| {model_name}, batch {batch}, float32 | this project, images/s '
           f'| timm {timm_model}, images/s | ratio ours/timm |',
           '|---|---|---|---|']
  for mode, size in cases:
    ours = statistics.median(rates[mode, size, 'ours'])
    theirs = statistics.median(rates[mode, size, 'timm'])
    lines.append(f'| {label[mode]}, {size} px | {ours:.1f} | {theirs:.1f} | '
                 f'{ours / theirs:.2f} |')
  return '\n'.join(lines)


def run(config, title, sizes, modes, batch, rounds, steps, peer_python,
        timm_model, settle_seconds, warmup_steps) -> str:
  """Times every (mode, size) case; returns the header and markdown table."""
  threads = len(os.sched_getaffinity(0))
  peer = Peer(peer_python, timm_model, batch, threads,
              config.model.get('dropout_rate', 0.0),
              config.model.get('stochastic_depth_rate', 0.0))
  try:
    ours = Ours(config, batch)
    cases = [(mode, size) for size in sizes for mode in modes]
    for mode, size in cases:  # compile / first-call costs, untimed
      getattr(ours, mode)(size, 1)
      getattr(peer, mode)(size, 1)
    print(f'parameters: ours {ours.parameters():,}, timm '
          f'{peer.info["parameters"]:,}', flush=True)
    rates = {}
    for round_index in range(rounds):
      order = (('ours', ours), ('timm', peer))
      if round_index % 2:
        order = order[::-1]
      for mode, size in cases:
        for who, model in order:
          time.sleep(settle_seconds)
          if warmup_steps:  # untimed: each side timed in its steady state
            getattr(model, mode)(size, warmup_steps)
          seconds = getattr(model, mode)(size, steps)
          model.hand_over()
          rates.setdefault((mode, size, who), []).append(
              batch * steps / seconds)
      print(f'round {round_index + 1}/{rounds}: ' + ', '.join(
          f'{mode} {size} px ours {rates[mode, size, "ours"][-1]:.1f} timm '
          f'{rates[mode, size, "timm"][-1]:.1f}' for mode, size in cases),
            flush=True)
  finally:
    peer.close()
  header = (
      f'{len(jax.devices())} {jax.default_backend()} device(s); {threads} '
      f'CPUs; jax {jax.__version__}, XLA_FLAGS='
      f'{os.environ.get("XLA_FLAGS", "")!r}; torch {peer.info["torch"]} '
      f'({peer.info["threads"]} threads), timm {peer.info["timm"]}; medians '
      f'of {rounds} alternating rounds of {steps} steps, each after a '
      f'{settle_seconds:g} s pause and {warmup_steps} untimed step(s)')
  return header + '\n\n' + table(rates, cases, batch, title, timm_model)


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:  # JAX's backend-probe INFO lines
    logging.set_verbosity(logging.WARNING)
  try:
    config = train_loop.load_config(_CONFIG.value)
    if not all(s.isdigit() for s in _SIZES.value):
      raise ValueError(f'--image_sizes {_SIZES.value}: expected whole '
                       'numbers of pixels, e.g. 64,224.')
    sizes = [int(s) for s in _SIZES.value]
    validate(config, sizes, _MODES.value, _BATCH.value, _ROUNDS.value,
             _STEPS.value, _PEER_PYTHON.value, _SETTLE.value, _WARMUP.value)
  except ValueError as e:
    print(f'peers.py: {e}', file=sys.stderr)
    sys.exit(errors.USER_ERROR_EXIT_CODE)
  title = {'nf_resnet50': 'NF-ResNet-50'}.get(_CONFIG.value, _CONFIG.value)
  print(run(config, title, sizes, _MODES.value, _BATCH.value, _ROUNDS.value,
            _STEPS.value, _PEER_PYTHON.value, _TIMM_MODEL.value,
            _SETTLE.value, _WARMUP.value))


if __name__ == '__main__':
  app.run(main)

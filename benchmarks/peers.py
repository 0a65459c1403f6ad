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
gives back the host memory its CPU steps keep (nfnets/cpu/runtime.py): an
idle process holding it slows the peer's steps.

  bash benchmarks/setup_peers.sh        # once
  python -m benchmarks.peers --image_sizes=64,224 --batch=32 --rounds=5 \
      --steps=3
"""

import json
import os
import subprocess
import time

from absl import flags
import jax

from benchmarks import harness
from nfnets import cli
from nfnets import errors
from nfnets import models
from nfnets.cpu import runtime as cpu_runtime

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
    'peer_python', os.path.join(harness.ROOT, '.venv-peers', 'bin', 'python'),
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
    self._steps = {}

  def _step(self, size: int) -> harness.TrainStep:
    if size not in self._steps:
      self._steps[size] = harness.TrainStep(
          harness.fake_config(self.config, self.batch, size), seed=size,
          forward=True)
    return self._steps[size]

  def parameters(self) -> int:
    params = next(iter(self._steps.values())).eval_params[0]
    return sum(leaf.size for leaf in jax.tree.leaves(params))

  def train(self, size: int, steps: int) -> float:
    return self._step(size).train(steps)

  def forward(self, size: int, steps: int) -> float:
    return self._step(size).forward(steps)

  def hand_over(self) -> None:
    """Before the peer runs: gives back the host memory our steps keep
    (nfnets/cpu/runtime.py), which would slow the peer."""
    cpu_runtime.release_kept_memory()


class Peer:
  """benchmarks/peers_timm.py running in the peer environment."""

  def __init__(self, python: str, model: str, batch: int, threads: int,
               dropout_rate: float, drop_path_rate: float):
    self.process = subprocess.Popen(
        [python, '-m', 'benchmarks.peers_timm', f'--model={model}', f'--batch={batch}', f'--threads={threads}',
         f'--dropout_rate={dropout_rate}',
         f'--drop_path_rate={drop_path_rate}'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        cwd=harness.ROOT)
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
  """Markdown table of median images/s; rates[(mode, size), who] = list."""
  label = {'train': 'train step', 'forward': 'forward only'}
  medians = harness.medians(rates)
  rows = []
  for case in cases:
    ours, theirs = medians[case, 'ours'], medians[case, 'timm']
    rows.append([f'{label[case[0]]}, {case[1]} px', f'{ours:.1f}',
                 f'{theirs:.1f}', f'{ours / theirs:.2f}'])
  return harness.markdown_table(
      [f'{model_name}, batch {batch}, float32', 'this project, images/s',
       f'timm {timm_model}, images/s', 'ratio ours/timm'], rows)


def run(config, title, sizes, modes, batch, rounds, steps, peer_python,
        timm_model, settle_seconds, warmup_steps) -> str:
  """Times every (mode, size) case; returns the header and markdown table."""
  threads = harness.cpu_count()
  peer = Peer(peer_python, timm_model, batch, threads,
              config.model.get('dropout_rate', 0.0),
              config.model.get('stochastic_depth_rate', 0.0))
  try:
    sides = {'ours': Ours(config, batch), 'timm': peer}
    cases = [(mode, size) for size in sizes for mode in modes]
    for mode, size in cases:  # compile / first-call costs, untimed
      for side in sides.values():
        getattr(side, mode)(size, 1)
    print(f'parameters: ours {sides["ours"].parameters():,}, timm '
          f'{peer.info["parameters"]:,}', flush=True)

    def measure(case, who):
      (mode, size), side = case, sides[who]
      time.sleep(settle_seconds)
      if warmup_steps:  # untimed: each side timed in its steady state
        getattr(side, mode)(size, warmup_steps)
      seconds = getattr(side, mode)(size, steps)
      side.hand_over()
      return batch * steps / seconds

    def after_round(round_index, rates):
      print(f'round {round_index + 1}/{rounds}: ' + ', '.join(
          f'{mode} {size} px ours {rates[(mode, size), "ours"][-1]:.1f} timm '
          f'{rates[(mode, size), "timm"][-1]:.1f}' for mode, size in cases),
            flush=True)

    rates = harness.alternate(rounds, cases, ('ours', 'timm'), measure,
                              after_round)
  finally:
    peer.close()
  header = (
      f'{len(jax.devices())} {jax.default_backend()} device(s); {threads} '
      f'CPUs; jax {jax.__version__}, XLA_FLAGS={harness.xla_flags()}; torch '
      f'{peer.info["torch"]} ({peer.info["threads"]} threads), timm '
      f'{peer.info["timm"]}; medians of {rounds} alternating rounds of '
      f'{steps} steps, each after a {settle_seconds:g} s pause and '
      f'{warmup_steps} untimed step(s)')
  return header + '\n\n' + table(rates, cases, batch, title, timm_model)


def main(argv):
  del argv
  config = harness.load_config(_CONFIG.value)
  try:
    if not all(s.isdigit() for s in _SIZES.value):
      raise ValueError(f'--image_sizes {_SIZES.value}: expected whole '
                       'numbers of pixels, e.g. 64,224.')
    sizes = [int(s) for s in _SIZES.value]
    validate(config, sizes, _MODES.value, _BATCH.value, _ROUNDS.value,
             _STEPS.value, _PEER_PYTHON.value, _SETTLE.value, _WARMUP.value)
  except ValueError as e:
    raise errors.UserError(str(e)) from None
  title = {'nf_resnet50': 'NF-ResNet-50'}.get(_CONFIG.value, _CONFIG.value)
  print(run(config, title, sizes, _MODES.value, _BATCH.value, _ROUNDS.value,
            _STEPS.value, _PEER_PYTHON.value, _TIMM_MODEL.value,
            _SETTLE.value, _WARMUP.value))


if __name__ == '__main__':
  cli.run(main)

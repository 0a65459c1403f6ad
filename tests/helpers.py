"""What several test files share: the scripts run in a subprocess, a
few-step quickstart, the jitted mix_batch, and one small training run whose
workdir the experiment, checkpointing and workdir tests read (or copy first
when they change it)."""

import os
import subprocess
import sys

import jax

import experiment
from configs import quickstart
from nfnets import mixing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [  # overrides for a few-second run of the quickstart config
    '--config.train.steps=24', '--config.train.batch_size=32',
    '--config.train.checkpoint_every_steps=6', '--config.train.log_every_steps=6',
    '--config.train.eval_every_steps=12', '--config.model.dropout_rate=0.2',
    '--config.model.stochastic_depth_rate=0.2', '--config.optim.ema_decay=0.9',
]


def run(args, env=None, timeout=600, check=True):
  """python ARGS in the repository root; fails the test on a non-zero exit
  unless check=False."""
  result = subprocess.run([sys.executable, *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
  if check:
    assert result.returncode == 0, result.stderr[-4000:]
  return result


# nfnets.mixing.mix_batch with seed, num_classes, mixup_alpha and cutmix static.
mix_batch = jax.jit(mixing.mix_batch, static_argnums=(0, 3, 4, 5))


def workdir_config(**train):
  """The quickstart at width 1/8: 18 steps, a checkpoint and signal
  statistics every 6."""
  config = quickstart.get_config()
  config.model.width = 0.125
  config.train.update({**dict(steps=18, batch_size=32, eval_batch_size=200,
                              checkpoint_every_steps=6, log_every_steps=6,
                              eval_every_steps=0,
                              signal_stats_every_steps=6), **train})
  return config


_TRAINED_RUN = []


def trained_run(tmp_path_factory):
  """(workdir, experiment, console lines) of an 18-step run of
  workdir_config() with checkpoints 6, 12, 18; trained on the first call of
  the test session, returned as is after that."""
  if not _TRAINED_RUN:
    workdir = str(tmp_path_factory.mktemp('run') / 'run')
    lines = []
    experiment.train_and_evaluate(workdir_config(), workdir, log=lines.append)
    _TRAINED_RUN.append((workdir, experiment.Experiment(workdir_config()),
                         lines))
  return _TRAINED_RUN[0]

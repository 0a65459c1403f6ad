"""A run's workdir (nfnets.workdir): a config change is refused or
recorded, and one writer at a time holds the lock."""

import json
import os
import shutil

import pytest

import experiment
import helpers
from nfnets import checkpointing
from nfnets import metric_writer
from nfnets import workdir as workdir_lib
from helpers import workdir_config as _config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A workdir with checkpoints 6, 12, 18, the experiment that made it and
  its console lines (helpers.trained_run: trained once per session)."""
  return helpers.trained_run(tmp_path_factory)


def test_config_change_is_refused_or_recorded(trained, tmp_path):
  source, _, _ = trained
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    before = f.read()
  changed = _config(steps=24)
  changed.optim.base_learning_rate = 0.3
  with pytest.raises(workdir_lib.ConfigChanged,
                     match=r'optim.base_learning_rate 0.2 -> 0.3, '
                           r'train.steps 18 -> 24'):
    experiment.train_and_evaluate(changed, workdir, log=lambda _: None)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert f.read() == before  # nothing written by the refused run
  lines = []
  experiment.train_and_evaluate(changed, workdir, allow_config_change=True,
                                log=lines.append)
  start = [line for line in lines if line.startswith('Training ')]
  assert len(start) == 1 and 'resuming from step 18' in start[0], lines
  with open(os.path.join(workdir, workdir_lib.HISTORY_FILE)) as f:
    history = [json.loads(line) for line in f]
  assert history == [{'step': 18, 'changes': {
      'optim.base_learning_rate': [0.2, 0.3], 'train.steps': [18, 24]}}]
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['optim']['base_learning_rate'] == 0.3
  # Each checkpoint keeps the config that produced it.
  exp = experiment.Experiment(changed)
  checkpointer = checkpointing.Checkpointer(workdir)
  assert checkpointer.restore(24, exp.abstract_state())[2]['train']['steps'] == 24
  assert checkpointer.restore(18, exp.abstract_state())[2]['train']['steps'] == 18
  checkpointer.close()
  # A finished run run again says so and prints its final metrics.
  lines = []
  final = experiment.train_and_evaluate(changed, workdir, log=lines.append)
  assert lines[-1].startswith('Already trained') and 'top1=' in lines[-1]
  assert final == metric_writer.last_eval(workdir, 24)


def test_second_lock_is_refused_and_a_released_lock_is_free(tmp_path):
  first = workdir_lib.Lock(str(tmp_path)).acquire()
  with pytest.raises(workdir_lib.WorkdirLocked, match=f'PID {os.getpid()}'):
    workdir_lib.Lock(str(tmp_path)).acquire()
  first.release()
  again = workdir_lib.Lock(str(tmp_path)).acquire()
  assert again.previous_holder is None  # released cleanly, not taken over
  again.release()

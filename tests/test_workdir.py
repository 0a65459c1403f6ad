"""A run's workdir stays safe: damaged checkpoints, config changes, a full
disk, concurrent runs, and user mistakes reported without tracebacks."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import experiment
from configs import quickstart
from nfnets import checkpointing
from nfnets import errors
from nfnets import metric_writer
from nfnets import spp
from nfnets import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# When a damaged checkpoint fails to restore, orbax abandons its per-array
# read coroutines; Python reports each as unraisable when it is collected,
# often during a later test (up to ~150 warnings). Harmless here: the tests
# check what happens to the checkpoints.
pytestmark = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning')


def _config(**train):
  config = quickstart.get_config()
  config.model.width = 0.125
  config.train.update({**dict(steps=18, batch_size=32, eval_batch_size=200,
                              checkpoint_every_steps=6, log_every_steps=6,
                              eval_every_steps=0,
                              signal_stats_every_steps=6), **train})
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A workdir with checkpoints 6, 12, 18 and the experiment that made it."""
  workdir = str(tmp_path_factory.mktemp('run') / 'run')
  lines = []
  experiment.train_and_evaluate(_config(), workdir, log=lines.append)
  return workdir, experiment.Experiment(_config()), lines


def test_console_has_start_progress_and_end_lines(trained):
  _, _, lines = trained
  assert lines[0].startswith('Training nf_resnet (') and '18 steps' in lines[0]
  progress = [l for l in lines if l.startswith('step ')]
  assert [l.split()[1] for l in progress] == ['6/18', '12/18', '18/18']
  assert all('img/s' in l and 'data wait' in l and 'ETA' in l
             for l in progress)
  assert lines[-1].startswith('Done: 18 steps') and 'top1=' in lines[-1]


def test_signal_statistics_are_logged_during_training(trained):
  workdir, exp, _ = trained
  rows = [r for r in metric_writer.read_metrics(workdir)
          if r['kind'] == 'signal']
  assert [r['step'] for r in rows] == [0, 6, 12, 18]
  for row in rows:
    assert {f'stage{s}/{name}' for s in range(1, 5) for name in (
        'squared_mean', 'variance', 'residual_variance')} <= set(row)
  # Step 0 is the initial parameters' signal propagation, measured anew.
  expected = spp.stage_statistics(exp.signal_statistics(exp.init_state()),
                                  exp.block_plan)
  for name, value in expected.items():
    assert rows[0][name] == pytest.approx(value, rel=1e-5), name
  # Training changes what the network does to its input.
  assert rows[-1]['stage4/variance'] != pytest.approx(
      rows[0]['stage4/variance'], rel=1e-4)


def _damage(checkpoint: str, kind: str) -> None:
  state = os.path.join(checkpoint, 'state')
  if kind == 'data_file':
    folder = os.path.join(state, 'ocdbt.process_0', 'd')
    biggest = max(os.listdir(folder),
                  key=lambda n: os.path.getsize(os.path.join(folder, n)))
    path = os.path.join(folder, biggest)
    # Cut in half (a partial copy or a full disk). Overwriting bytes in the
    # middle is not always detected: tensorstore keeps no checksums, so a
    # flipped byte in an uncompressed chunk reads back as a wrong value.
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  elif kind == 'manifest':
    os.remove(os.path.join(state, 'manifest.ocdbt'))
  elif kind == 'metadata':
    os.remove(os.path.join(state, '_METADATA'))
  elif kind == 'iterator_state':
    open(os.path.join(checkpoint, 'data', 'metadata'), 'w').close()


@pytest.mark.parametrize('kind', ['data_file', 'manifest', 'metadata',
                                  'iterator_state'])
def test_damaged_newest_checkpoint_is_set_aside(trained, tmp_path, kind):
  source, exp, _ = trained
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  _damage(os.path.join(workdir, 'checkpoints', '18'), kind)
  warnings = []
  # eval.py's read-only view: falls back, names the damaged step, moves
  # nothing.
  reader = checkpointing.Checkpointer(workdir, read_only=True)
  step, *_ = reader.restore_latest_intact(exp.abstract_state(),
                                          warn=warnings.append)
  reader.close()
  assert step == 12 and os.path.isdir(os.path.join(workdir, 'checkpoints',
                                                   '18'))
  assert len(warnings) == 1 and 'step 18 ' in warnings[0]
  # Training: moves it aside (never deletes) and resumes from 12.
  warnings.clear()
  writer = checkpointing.Checkpointer(workdir)
  step, state, data_state, config = writer.restore_latest_intact(
      exp.abstract_state(), warn=warnings.append)
  writer.close()
  assert step == 12 and int(state['step']) == 12 and data_state
  assert config['model']['width'] == 0.125
  assert len(warnings) == 1 and 'damaged/18' in warnings[0]
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', 'damaged', '18'))
  assert checkpointing.Checkpointer(workdir).all_steps() == [6, 12]


def test_every_checkpoint_unreadable_moves_nothing(trained, tmp_path):
  source, exp, _ = trained
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  for step in (6, 12, 18):
    _damage(os.path.join(workdir, 'checkpoints', str(step)), 'metadata')
  checkpointer = checkpointing.Checkpointer(workdir)
  with pytest.raises(checkpointing.CheckpointDamaged, match='step 18'):
    checkpointer.restore_latest_intact(exp.abstract_state())
  assert checkpointer.all_steps() == [6, 12, 18]


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
  assert 'resuming from step 18' in lines[0]
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


def test_disk_full_names_disk_step_and_last_good_checkpoint(
    trained, tmp_path, monkeypatch):
  source, exp, _ = trained
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  checkpointer = checkpointing.Checkpointer(workdir)
  state = checkpointer.restore(18, exp.abstract_state())[0]
  partial = os.path.join(checkpointer.directory, '24.orbax-checkpoint-tmp-1')

  def full_disk(*args, **kwargs):
    os.makedirs(partial)
    raise ValueError('RESOURCE_EXHAUSTED: Error writing local file: '
                     '[OS error 28: No space left on device]')

  monkeypatch.setattr(checkpointer.manager, 'save', full_disk)
  with pytest.raises(checkpointing.DiskFull,
                     match=r'No space left on the disk of .*checkpoint of '
                           r'step 24; the last intact checkpoint is step 18'):
    checkpointer.save(24, state, {})
  assert not os.path.exists(partial)
  checkpointer.close()


def test_second_lock_is_refused_and_a_released_lock_is_free(tmp_path):
  first = workdir_lib.Lock(str(tmp_path)).acquire()
  with pytest.raises(workdir_lib.WorkdirLocked, match=f'PID {os.getpid()}'):
    workdir_lib.Lock(str(tmp_path)).acquire()
  first.release()
  again = workdir_lib.Lock(str(tmp_path)).acquire()
  assert again.previous_holder is None  # released cleanly, not taken over
  again.release()


# (arguments, extra environment, expected message) for train.py / eval.py.
_QUICK = ['--config=configs/quickstart.py', '--config.train.steps=2']
USER_ERRORS = {
    'unknown_field': (['train.py', *_QUICK, '--config.model.widht=0.5'], {},
                      "unknown config field 'model.widht'"),
    'bad_value_type': (['train.py', *_QUICK, '--config.train.batch_size=abc'],
                       {}, 'invalid literal'),
    'alpha_zero': (['train.py', *_QUICK, '--config.model.alpha=0'], {},
                   'alpha must be > 0, got 0'),
    'negative_batch': (['train.py', *_QUICK, '--config.train.batch_size=-4'],
                       {}, 'train.batch_size must be >= 1, got -4'),
    'batch_vs_devices': (
        ['train.py', *_QUICK, '--config.train.batch_size=12'],
        {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'},
        'train.batch_size=12 is not divisible by the 8 devices'),
    'tiny_images': (['train.py', *_QUICK, '--config.data.image_size=16'], {},
                    'Image size 16 px is too small'),
    'unknown_activation': (['train.py', *_QUICK,
                            '--config.model.activation=relu7'], {}, 'relu7'),
    'unknown_model': (['train.py', *_QUICK, '--config.model.name=vit'], {},
                      "Unknown model 'vit'"),
    'num_classes': (['train.py', *_QUICK, '--config.model.num_classes=5'], {},
                    'model.num_classes=5'),
    'missing_config': (['train.py', '--config=configs/nope.py'], {},
                       "config file 'configs/nope.py' not found"),
    'workdir_is_file': (['train.py', *_QUICK], {}, 'is a file, not a folder'),
    'eval_empty_workdir': (['eval.py', *_QUICK], {}, 'No checkpoints in'),
    'eval_mistyped_workdir': (['eval.py', *_QUICK], {}, 'does not exist'),
}


def test_user_errors_are_one_or_two_lines_without_traceback(tmp_path):
  processes = {}
  for name, (args, env, _) in USER_ERRORS.items():
    workdir = tmp_path / name
    if name == 'workdir_is_file':
      workdir.write_text('')
    elif name == 'eval_empty_workdir':
      workdir.mkdir()
    processes[name] = subprocess.Popen(
        [sys.executable, *args, f'--workdir={workdir}'], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, **env})
  for name, process in processes.items():
    stdout, stderr = process.communicate(timeout=600)
    expected = USER_ERRORS[name][2]
    assert process.returncode == errors.USER_ERROR_EXIT_CODE, (name, stderr)
    assert expected in stderr, (name, stderr)
    assert 'Traceback' not in stderr + stdout, (name, stderr)
    assert len(stderr.strip().splitlines()) <= 2, (name, stderr)
  # Refused runs leave no workdir behind; eval creates none.
  for name in ('alpha_zero', 'negative_batch', 'tiny_images',
               'eval_mistyped_workdir'):
    assert not (tmp_path / name).exists(), name

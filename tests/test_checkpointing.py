"""Checkpoints (nfnets.checkpointing) of a real run: a damaged newest
checkpoint is set aside (and only read around by eval's read-only view),
nothing is moved when none is readable, and a full disk is named."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import experiment
import helpers
from nfnets import checkpointing

# When a damaged checkpoint fails to restore, orbax abandons its per-array
# read coroutines; Python reports each as unraisable when it is collected,
# often during a later test (up to ~150 warnings). Harmless here: the tests
# check what happens to the checkpoints.
pytestmark = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A workdir with checkpoints 6, 12, 18, the experiment that made it and
  its console lines (helpers.trained_run: trained once per session)."""
  return helpers.trained_run(tmp_path_factory)


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


def _files(folder):
  return sorted(os.path.join(root, name)
                for root, _, names in os.walk(folder) for name in names)


def _equal_trees(a, b) -> bool:
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  return tree_a == tree_b and all(
      np.asarray(x).dtype == np.asarray(y).dtype
      and np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(flat_a, flat_b))


def test_no_damaged_file_loads_silently(trained, tmp_path):
  """Every file of a checkpoint, with a byte flipped at its start, middle
  and end, and cut in half: reading it either fails with a readable reason
  (then it is handled as damage) or gives exactly what was written (bytes
  nobody reads, e.g. timestamps); never a changed state."""
  source, exp, _ = trained
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  reader = checkpointing.Checkpointer(workdir, read_only=True)
  want = reader.restore(18, exp.abstract_state())
  files = _files(os.path.join(workdir, 'checkpoints', '18'))
  assert any('checksums' in f for f in files)
  reasons, unread = [], 0
  for path in files:
    with open(path, 'rb') as f:
      original = f.read()
    size = len(original)
    cases = [original[:i] + bytes([original[i] ^ 0x55]) + original[i + 1:]
             for i in sorted({0, size // 2, size - 1}) if size]
    cases.append(original[:size // 2])
    for damaged in cases:
      with open(path, 'wb') as f:
        f.write(damaged)
      try:
        got = reader.restore(18, exp.abstract_state())
      except Exception as e:  # pylint: disable=broad-except
        reason = checkpointing.readable_reason(e)
        assert reason and not any(marker in reason for marker in (
            'pybind11', '<bound method', 'TensorStore({', 'NoneType')), (
                path, reason)
        reasons.append(reason)
      else:
        assert _equal_trees(got[0], want[0]), path
        assert got[1:] == want[1:], path
        unread += 1
      finally:
        with open(path, 'wb') as f:
          f.write(original)
  reader.close()
  assert reasons and unread  # both happen: commit markers are never read
  # The checksums catch what the storage reads back without complaint.
  assert any(r.startswith('checksum mismatch in params/') for r in reasons), (
      sorted(set(reasons)))


def test_reader_beside_a_checkpointing_run_never_fails(tmp_path):
  """eval.py's read-only view, 25 times while a run writes a checkpoint
  every 2 steps and deletes all but the newest 2: every read returns an
  intact checkpoint; the only notes allowed say one was removed mid-read."""
  workdir = str(tmp_path / 'run')
  process = subprocess.Popen(
      [sys.executable, 'train.py', '--config=configs/quickstart.py',
       '--config.model.width=0.125', '--config.train.steps=100000',
       '--config.train.batch_size=32', '--config.train.log_every_steps=1000',
       '--config.train.checkpoint_every_steps=2',
       '--config.train.keep_checkpoints=2', f'--workdir={workdir}'],
      cwd=helpers.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True)
  abstract_state = experiment.Experiment(helpers.workdir_config()
                                         ).abstract_state()
  checkpoints = os.path.join(workdir, 'checkpoints')
  deadline = time.time() + 300
  while time.time() < deadline and not (
      os.path.isdir(checkpoints) and any(n.isdigit()
                                         for n in os.listdir(checkpoints))):
    time.sleep(0.05)
  steps, notes = [], []
  try:
    while len(steps) < 25 and process.poll() is None:
      reader = checkpointing.Checkpointer(workdir, read_only=True)
      step, state, _, _ = reader.restore_latest_intact(abstract_state,
                                                       warn=notes.append)
      reader.close()
      assert int(state['step']) == step
      steps.append(step)
  finally:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
  assert len(steps) == 25 and steps == sorted(steps) and steps[-1] > steps[0]
  assert all('removed while being read' in n for n in notes), notes
  assert 'Stopped by SIGTERM' in stderr, stderr

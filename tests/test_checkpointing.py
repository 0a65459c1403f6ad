"""Checkpoints (nfnets.checkpointing) of a real run: a damaged newest
checkpoint is set aside (and only read around by eval's read-only view),
nothing is moved when none is readable, and a full disk is named."""

import os
import shutil

import pytest

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

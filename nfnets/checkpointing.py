"""Checkpoints with orbax: the train state (arrays) plus the data iterator state.

orbax writes each checkpoint into a temporary folder and renames it when
complete, so a process killed at any moment leaves the latest finished
checkpoint intact; unfinished temporary folders are never read back. No
pickle anywhere: arrays are stored by tensorstore, the iterator state as JSON.
"""

import errno
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from nfnets import errors


class CheckpointMismatchError(errors.UserError):
  """The stored parameter tree does not fit the configured model."""


def _flat_shapes(tree) -> dict[str, tuple]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): tuple(getattr(leaf, 'shape', ()))
          for path, leaf in flat}


def describe_mismatch(expected, stored) -> str:
  """A readable list of what differs between two trees of arrays (or None)."""
  want, have = _flat_shapes(expected), _flat_shapes(stored)
  lines = []
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])
  for title, keys, fmt in (
      ('missing from the checkpoint', missing, lambda k: f'{k} {want[k]}'),
      ('in the checkpoint but not in the model', extra,
       lambda k: f'{k} {have[k]}'),
      ('different shapes (model vs checkpoint)', shapes,
       lambda k: f'{k}: {want[k]} vs {have[k]}')):
    if keys:
      lines.append(f'{len(keys)} {title}: ' + ', '.join(
          fmt(k) for k in keys[:6]) + (' ...' if len(keys) > 6 else ''))
  return '; '.join(lines)


class CheckpointDamaged(errors.UserError):
  """A checkpoint that cannot be read back."""


class DiskFull(errors.UserError):
  """A checkpoint could not be written for lack of space."""


_NO_SPACE_MARKERS = ('No space left', 'RESOURCE_EXHAUSTED', 'ENOSPC',
                     'Disk quota exceeded')


class Checkpointer:
  """Periodic checkpoints in <workdir>/checkpoints, keeping the last N.

  Each checkpoint holds three items: 'state' (the train state arrays),
  'data' (the iterator state, JSON) and 'config' (the config that trained
  it, JSON). read_only=True (eval) creates and moves nothing.
  """

  def __init__(self, workdir: str, max_to_keep: int = 3,
               read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.read_only = read_only
    if read_only and not os.path.isdir(self.directory):
      raise errors.UserError(f'No checkpoints in {os.path.abspath(workdir)}: '
                             f'{self.directory} does not exist.')
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only,
            read_only=read_only, cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=False),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler(),
                       'config': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict | None,
           config_dict: dict | None = None) -> None:
    """Writes checkpoint `step` and waits until it is complete on disk.

    Raises DiskFull (naming the disk, the step and the last intact
    checkpoint) when space runs out; the partial write is removed.
    """
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state or {}),
          config=ocp.args.JsonSave(config_dict or {})))
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if not _is_disk_full(e):
        raise
      self._remove_partial_writes()
      usage = shutil.disk_usage(self.directory)
      latest = self.latest_step()
      raise DiskFull(
          f'No space left on the disk of {self.directory} '
          f'({_mebibytes(usage.free)} free of {_mebibytes(usage.total)}) '
          f'while writing the checkpoint of step {step}; '
          + (f'the last intact checkpoint is step {latest}. Free space and '
             'rerun the same command to resume from it.'
             if latest is not None else
             'no checkpoint was written before. Free space and rerun.')
      ) from None

  def _remove_partial_writes(self) -> None:
    for name in os.listdir(self.directory):
      if 'orbax-checkpoint-tmp' in name:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state, other_layouts=()):
    """(state, data_state, config_dict or None) of step; abstract_state
    gives structure, shapes and shardings. other_layouts: [(to_other,
    back)] of the model's other parameter layouts (models.other_layouts):
    a checkpoint stored in one of them is read in it and converted back.
    Raises CheckpointMismatchError naming what differs, FileNotFoundError
    for a step that is not there, and the storage's own error for a
    damaged checkpoint."""
    if step not in self.manager.all_steps():
      raise FileNotFoundError(
          f'No checkpoint for step {step} in {self.directory}; available: '
          f'{self.all_steps()}.')
    stored = self.manager.item_metadata(step)['state']
    stored = getattr(stored, 'tree', stored)
    mismatch = describe_mismatch(abstract_state['params'], stored['params'])
    back = None
    for to_other, to_model in other_layouts if mismatch else ():
      other = to_other(abstract_state)
      if not describe_mismatch(other['params'], stored['params']):
        abstract_state, back, mismatch = other, to_model, ''
        break
    if mismatch:
      raise CheckpointMismatchError(
          f'Checkpoint {self.directory} step {step} does not fit the '
          f'configured model: {mismatch}.')
    items = dict(state=ocp.args.StandardRestore(abstract_state),
                 data=ocp.args.JsonRestore())
    has_config = os.path.isdir(os.path.join(self.directory, str(step),
                                            'config'))
    if has_config:
      items['config'] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    config = restored['config'] if has_config else None
    state = restored['state'] if back is None else back(restored['state'])
    return state, restored['data'], config or None

  def restore_latest_intact(self, abstract_state, warn=print,
                            other_layouts=()):
    """(step, state, data_state, config_dict) of the newest checkpoint that
    reads back, or None if there is none.

    A checkpoint that fails to read while an older one reads fine is
    damaged: training moves it to checkpoints/damaged/<step> (never
    deletes it), read-only use skips it; either way one warning line. If
    every checkpoint fails the same way the problem is not the files: the
    newest one's error is raised and nothing is moved.
    """
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, data_state, config = self.restore(step, abstract_state,
                                                 other_layouts)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        failures.append((step, e))
        continue
      for bad_step, error in failures:
        self._set_aside(bad_step, error, warn)
      return step, state, data_state, config
    if failures:
      step, error = failures[0]
      raise CheckpointDamaged(
          f'No checkpoint in {self.directory} can be read; the newest '
          f'(step {step}) fails with {type(error).__name__}: '
          f'{_first_line(error)}') from error
    return None

  def _set_aside(self, step: int, error: Exception, warn) -> None:
    reason = f'{type(error).__name__}: {_first_line(error)}'
    if self.read_only:
      warn(f'warning: checkpoint step {step} in {self.directory} is damaged '
           f'({reason}); using an older one.')
      return
    damaged = os.path.join(self.directory, 'damaged')
    os.makedirs(damaged, exist_ok=True)
    target = os.path.join(damaged, str(step))
    suffix = 1
    while os.path.exists(target):
      target = os.path.join(damaged, f'{step}.{suffix}')
      suffix += 1
    os.rename(os.path.join(self.directory, str(step)), target)
    self.manager.reload()
    warn(f'warning: checkpoint step {step} is damaged ({reason}); moved to '
         f'{target}, resuming from an older one.')

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _mebibytes(size: int) -> str:
  return f'{size / 2**20:,.0f} MiB'


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return text[0][:300] if text else ''


def _is_disk_full(error: BaseException) -> bool:
  while error is not None:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if any(marker in str(error) for marker in _NO_SPACE_MARKERS):
      return True
    error = error.__cause__ or error.__context__
  return False


def to_host(tree):
  return jax.tree.map(np.asarray, tree)

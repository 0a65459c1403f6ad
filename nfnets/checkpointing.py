"""Checkpoints with orbax: the train state (arrays) plus the data iterator state.

orbax writes each checkpoint into a temporary folder and renames it when
complete, so a process killed at any moment leaves the latest finished
checkpoint intact; unfinished temporary folders are never read back. No
pickle anywhere: arrays are stored by tensorstore, the iterator state as JSON.

tensorstore keeps no checksums of its own (a flipped byte in an uncompressed
chunk reads back as a wrong value), so every checkpoint also stores a CRC-32
of each array and of the two JSON items, computed at save and verified at
every restore; a mismatch is damage like an unreadable file.
"""

import functools
import json
import os
import shutil
import time
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from nfnets import errors
from nfnets import workdir as workdir_lib


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
  """A checkpoint that cannot be read back, or reads back wrong."""


def _path_name(path) -> str:
  """'params/resnet/block2/shortcut/w' for a tree_flatten_with_path key."""
  parts = []
  for key in path:
    for attribute in ('key', 'name', 'idx'):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def _array_checksum(leaf) -> int | None:
  """CRC-32 of one array's dtype, shape and contents as this process sees
  it (None: sharded over processes, so no single process holds all of it).
  Reads the array's memory in place, without a copy."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    if not leaf.is_fully_replicated:
      return None
    leaf = leaf.addressable_data(0)
  array = np.ascontiguousarray(np.asarray(leaf))
  header = zlib.crc32(f'{array.dtype.str}{array.shape}'.encode())
  return zlib.crc32(array.reshape(-1).view(np.uint8), header)


def checksums(state, data_state: dict, config_dict: dict) -> dict:
  """{'arrays': {path: CRC-32}, 'data': CRC-32, 'config': CRC-32}: what a
  checkpoint of these items must read back as (dtype and shape included)."""
  arrays = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    checksum = _array_checksum(leaf)
    if checksum is not None:
      arrays[_path_name(path)] = checksum
  return dict(arrays=arrays, data=_json_checksum(data_state),
              config=_json_checksum(config_dict))


def _json_checksum(value) -> int:
  return zlib.crc32(json.dumps(value or {}, sort_keys=True).encode())


def verify(stored: dict, state, data_state: dict, config_dict) -> None:
  """Raises CheckpointDamaged naming the first item whose checksum differs
  from the one stored at save time."""
  actual = checksums(state, data_state, config_dict)
  for name in ('data', 'config'):
    if stored.get(name) != actual[name]:
      raise CheckpointDamaged(f'checksum mismatch in the {name} item')
  expected = stored.get('arrays', {})
  for name, value in actual['arrays'].items():
    if expected.get(name) != value:
      raise CheckpointDamaged(f'checksum mismatch in {name}'
                              if name in expected else
                              f'no stored checksum for {name}')


class DiskFull(errors.UserError):
  """A checkpoint could not be written for lack of space."""



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
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=False)
    handlers = {'state': ocp.StandardCheckpointHandler(),
                'data': ocp.JsonCheckpointHandler(),
                'config': ocp.JsonCheckpointHandler(),
                'checksums': ocp.JsonCheckpointHandler()}
    self.manager = self._listing(lambda: ocp.CheckpointManager(
        self.directory, options=options, item_handlers=handlers))

  def _listing(self, list_checkpoints):
    """list_checkpoints() (orbax reads every listed checkpoint's metadata),
    again if a running training removed one between the listing and the
    read (read-only use)."""
    for attempt in range(_MAX_LISTINGS):
      try:
        return list_checkpoints()
      except FileNotFoundError:
        if not self.read_only or attempt == _MAX_LISTINGS - 1:
          raise
        time.sleep(0.05)

  def reload(self) -> None:
    self._listing(self.manager.reload)

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
    data_state, config_dict = data_state or {}, config_dict or {}
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(config_dict),
          checksums=ocp.args.JsonSave(
              checksums(state, data_state, config_dict))))
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if not errors.is_disk_full(e):
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

  def restore(self, step: int, abstract_state, other_layouts=(),
              warn=None, config_dict=None):
    """(state, data_state, config_dict or None) of step; abstract_state
    gives structure, shapes and shardings (None: the state as stored, on
    the first device, of which only WEIGHT_ITEMS are returned: for
    inference and init_from). other_layouts: [(to_other,
    back)] of the model's other parameter layouts (models.other_layouts):
    a checkpoint stored in one of them is read in it and converted back.
    Raises CheckpointMismatchError naming what differs, FileNotFoundError
    for a step that is not there, CheckpointDamaged for contents that
    differ from their checksums, and the storage's own error for files it
    cannot read. warn(line) hears of a checkpoint that has no checksums
    (written before they were stored), which is read unverified.
    config_dict: the current config, to name the model fields that differ
    from the checkpoint's in a mismatch error."""
    if step not in self.manager.all_steps():
      raise FileNotFoundError(
          f'No checkpoint for step {step} in {self.directory}; available: '
          f'{self.all_steps()}.')
    stored = self.manager.item_metadata(step)['state']
    stored = getattr(stored, 'tree', stored)
    weights_only = abstract_state is None
    if weights_only:
      abstract_state = _as_stored(stored)
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
          f'configured model: {mismatch}.'
          + self._model_differences(step, config_dict))
    items = dict(state=ocp.args.StandardRestore(abstract_state),
                 data=ocp.args.JsonRestore())
    present = {name for name in ('config', 'checksums') if os.path.isdir(
        os.path.join(self.directory, str(step), name))}
    for name in present:
      items[name] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    config = restored['config'] if 'config' in present else None
    if 'checksums' in present:
      verify(restored['checksums'], restored['state'], restored['data'],
             config)
    elif warn is not None:
      warn(f'note: checkpoint step {step} has no checksums (written by an '
           'older version); its contents are read unverified.')
    state = restored['state'] if back is None else back(restored['state'])
    if weights_only:
      state = {name: state[name] for name in WEIGHT_ITEMS if name in state}
    return state, restored['data'], config or None

  def _model_differences(self, step: int, config_dict) -> str:
    """' The checkpoint was trained with model.width 0.25 (this config:
    0.5).' or '' when unknown."""
    if not config_dict or not os.path.isdir(
        os.path.join(self.directory, str(step), 'config')):
      return ''
    try:
      stored = self.manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))['config']
    except Exception:  # pylint: disable=broad-except
      return ''
    changes = workdir_lib.differences(
        dict(model=stored.get('model', {})),
        dict(model=config_dict.get('model', {})))
    if not changes:
      return ''
    return ' The checkpoint was trained with ' + ', '.join(
        f'{name}={old!r} (this config: {new!r})'
        for name, (old, new) in changes.items()) + '.'

  def restore_latest_intact(self, abstract_state, warn=print,
                            other_layouts=(), config_dict=None):
    """(step, state, data_state, config_dict) of the newest checkpoint that
    reads back intact, or None if there is none.

    A checkpoint that fails to read or to match its checksums while an
    older one reads fine is damaged: training moves it to
    checkpoints/damaged/<step> (never deletes it), read-only use skips it;
    either way one warning line with the reason. If every checkpoint fails
    the same way the problem is not the files: the newest one's error is
    raised and nothing is moved.

    Read-only use beside a running training tolerates the writer: a
    checkpoint removed by its retention while being read is skipped with a
    note, and a failed read is retried once on a fresh listing before the
    checkpoint is called damaged.
    """
    failures, tried = [], set()
    for _ in range(_MAX_LISTINGS):
      removed = False
      for step in sorted(set(self.manager.all_steps()) - tried,
                         reverse=True):
        tried.add(step)
        try:
          state, data_state, config = self._restore_tolerating_writer(
              step, abstract_state, other_layouts, warn, config_dict)
        except CheckpointMismatchError:
          raise
        except _RemovedWhileReading:
          warn(f'note: checkpoint step {step} was removed while being read '
               '(the running training keeps only the newest ones); using '
               'the next newest.')
          removed = True
          continue
        except Exception as e:  # pylint: disable=broad-except
          failures.append((step, e))
          continue
        for bad_step, error in failures:
          self._set_aside(bad_step, error, warn)
        return step, state, data_state, config
      if not removed:
        break
      self.reload()  # every listed one went: newer ones exist
    if failures:
      step, error = failures[0]
      raise CheckpointDamaged(
          f'No checkpoint in {self.directory} can be read; the newest '
          f'(step {step}) fails: {readable_reason(error)}') from error
    return None

  def _restore_tolerating_writer(self, step, abstract_state, other_layouts,
                                 warn, config_dict):
    restore = functools.partial(self.restore, step, abstract_state,
                                other_layouts, warn, config_dict)
    if not self.read_only:  # the only writer: a failure is damage
      return restore()
    folder = os.path.join(self.directory, str(step))
    try:
      return restore()
    except CheckpointMismatchError:
      raise
    except Exception:  # pylint: disable=broad-except
      if not os.path.isdir(folder):
        raise _RemovedWhileReading() from None
    # Caught mid-write or mid-removal by another process: look again.
    time.sleep(_REREAD_DELAY_SECONDS)
    self.reload()
    if not os.path.isdir(folder):
      raise _RemovedWhileReading()
    try:
      return restore()
    except FileNotFoundError:
      raise _RemovedWhileReading() from None
    except Exception:  # pylint: disable=broad-except
      if not os.path.isdir(folder):
        raise _RemovedWhileReading() from None
      raise

  def _set_aside(self, step: int, error: Exception, warn) -> None:
    reason = readable_reason(error)
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
    self.reload()
    warn(f'warning: checkpoint step {step} is damaged ({reason}); moved to '
         f'{target}, resuming from an older one.')

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


WEIGHT_ITEMS = ('params', 'bn_state', 'ema_params')


def _as_stored(stored_metadata) -> dict:
  """A stored train state's metadata as an abstract tree: shapes and dtypes
  as stored, on the first local device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype,
                                        sharding=device),
      dict(stored_metadata))


def _mebibytes(size: int) -> str:
  return f'{size / 2**20:,.0f} MiB'


class _RemovedWhileReading(Exception):
  """The checkpoint folder disappeared while a read-only user read it."""


_REREAD_DELAY_SECONDS = 0.5
_MAX_LISTINGS = 10  # a reader outpaced by retention lists again, this often

# Text from the storage libraries' internals, which tells a user nothing.
_INTERNAL_MARKERS = ('pybind11', '<bound method', 'TensorStore({',
                     'NoneType', 'object is not subscriptable')


def readable_reason(error: BaseException) -> str:
  """What is wrong with a checkpoint, in words a user can act on: our own
  message, or the first library message in the chain that names a file or
  a problem rather than library internals."""
  if isinstance(error, CheckpointDamaged):
    return str(error)
  seen = error
  while seen is not None:
    line = _first_line(seen)
    if line and not any(marker in line for marker in _INTERNAL_MARKERS):
      if isinstance(seen, KeyError):
        return f'an item is missing: {line}'
      if isinstance(seen, (json.JSONDecodeError, UnicodeDecodeError)):
        return 'a JSON item is not valid JSON (truncated or overwritten)'
      return line
    seen = seen.__cause__ or seen.__context__
  return ('its files cannot be decoded (truncated or overwritten); '
          f'{type(error).__name__}')


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0][:300] if text else ''


def to_host(tree):
  return jax.tree.map(np.asarray, tree)

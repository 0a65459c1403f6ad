"""A run's workdir: one writer at a time, and a true record of its config.

Files (besides checkpoints/, metrics.jsonl, tensorboard/):
  train.lock           who holds the workdir (host, PID, start), empty when free
  config.json          the config of the run now training (written only after
                       the config validated and matched the checkpoints)
  config_history.jsonl one row per accepted config change: step and changes
  class_names.json     the dataset's class names in label order (if known)

The lock is an fcntl.flock on train.lock held for the life of the process;
the kernel releases it when the process ends in any way (kill -9 included),
so a lock left by a dead run is simply taken over. Multi-host jobs: only
process 0 takes it (the workdir is one shared folder, and the job's processes
are started together), so one job excludes another job, not its own peers.
flock works on local disks and on NFSv4; on file systems without locking a
second run is not detected.
"""

import datetime
import fcntl
import json
import os
import shutil
import socket

from nfnets import errors

LOCK_FILE = 'train.lock'
CONFIG_FILE = 'config.json'
CLASS_NAMES_FILE = 'class_names.json'
HISTORY_FILE = 'config_history.jsonl'
# Fields that change how a run is read, logged or scheduled on the machine,
# not what it computes: a resume may change them freely.
UNRECORDED_FIELDS = ('data.data_dir', 'data.num_workers',
                     'train.log_every_steps', 'train.eval_batch_size')


class WorkdirLocked(errors.UserError):
  """Another live process is training in this workdir."""


class ConfigChanged(errors.UserError):
  """The config differs from the one that trained the checkpoints."""


def remove_if_unused(path: str) -> None:
  """Removes a workdir this run created if it holds no file of value (only
  the lock and empty folders), so a run refused at start leaves nothing."""
  for folder, _, files in os.walk(path):
    if any(not (folder == path and name == LOCK_FILE) for name in files):
      return
  shutil.rmtree(path, ignore_errors=True)


def remove_new_if_unused(path: str, before: set[str]) -> None:
  """In a workdir that existed before this run (holding `before`, the
  names listed at start): removes what the run added if none of it holds a
  file of value (only the lock and empty folders), so a run refused at
  start leaves the folder as it found it."""
  added = set(os.listdir(path)) - before
  for name in added:
    full = os.path.join(path, name)
    if name != LOCK_FILE and (not os.path.isdir(full) or any(
        files for _, _, files in os.walk(full))):
      return
  for name in added:
    full = os.path.join(path, name)
    if os.path.isdir(full):
      shutil.rmtree(full, ignore_errors=True)
    else:
      os.remove(full)


class Lock:
  """Exclusive hold on a workdir for the life of this process (or close())."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._file = None
    self.previous_holder = None  # a dead run's record, when taken over

  def acquire(self) -> 'Lock':
    handle = open(self.path, 'a+')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = _describe_holder(handle.read())
      handle.close()
      raise WorkdirLocked(
          f'{os.path.dirname(self.path)} is in use by another training run '
          f'({holder}). Wait for it to end, stop it, or choose another '
          '--workdir.') from None
    handle.seek(0)
    stale = handle.read().strip()
    if stale:
      self.previous_holder = _describe_holder(stale)
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(dict(
        host=socket.gethostname(), pid=os.getpid(),
        started=datetime.datetime.now().astimezone().isoformat(
            timespec='seconds'))) + '\n')
    handle.flush()
    self._file = handle
    return self

  def release(self) -> None:
    # Emptied, not deleted: deleting would let a waiting process lock an
    # orphaned inode while a third one locks a new file.
    if self._file is not None:
      self._file.seek(0)
      self._file.truncate()
      self._file.flush()
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def _describe_holder(text: str) -> str:
  try:
    holder = json.loads(text)
    return (f'host {holder["host"]}, PID {holder["pid"]}, started '
            f'{holder["started"]}')
  except (ValueError, KeyError, TypeError):
    return 'holder unknown'


def flatten(config_dict: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}; sequences as lists (JSON form)."""
  flat = {}
  for key, value in config_dict.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      flat.update(flatten(value, name + '.'))
    else:
      flat[name] = list(value) if isinstance(value, tuple) else value
  return flat


def write_class_names(workdir: str, names: list[str]) -> None:
  """class_names.json: the dataset's class names, label order (for
  predict.py); written atomically, replaced only if they differ."""
  path = os.path.join(workdir, CLASS_NAMES_FILE)
  if read_class_names(workdir) == list(names):
    return
  partial = f'{path}.partial-{os.getpid()}'
  with open(partial, 'w') as f:
    json.dump(list(names), f, indent=0)
  os.replace(partial, path)


def read_class_names(workdir: str) -> list[str] | None:
  """The names class_names.json holds, or None without a readable one."""
  try:
    with open(os.path.join(workdir, CLASS_NAMES_FILE)) as f:
      names = json.load(f)
  except (OSError, ValueError):
    return None
  return names if isinstance(names, list) else None


def config_to_dict(config) -> dict:
  """A ConfigDict as plain JSON data."""
  return json.loads(config.to_json_best_effort())


# Fields configs gained after runs may have recorded theirs, with the value
# that computes what those runs computed: a recorded config without one of
# them reads as having that value.
FIELDS_ADDED_LATER = {
    'matmul_precision': 'highest', 'deterministic': False,
    'init_from.path': '', 'init_from.use_ema': False,
    'init_from.new_classifier': False, 'train.accumulation_steps': 1,
    'train.bn_sync_devices': True, 'model.ws_form': 'authors',
    'model.padding': 'same', 'model.strided_shortcut': 'conv',
}


def differences(recorded: dict, current: dict) -> dict:
  """{field: [recorded value, current value]} for every field that differs,
  except UNRECORDED_FIELDS; a missing field shows as None (or as its value
  in FIELDS_ADDED_LATER)."""
  old, new = flatten(recorded), flatten(current)
  old = {name: value for name, value in FIELDS_ADDED_LATER.items()
         if name in new} | old
  return {name: [old.get(name), new.get(name)]
          for name in sorted(set(old) | set(new))
          if old.get(name) != new.get(name) and name not in UNRECORDED_FIELDS}


def describe(changes: dict) -> str:
  return ', '.join(f'{name} {old!r} -> {new!r}'
                   for name, (old, new) in changes.items())


def check_config(workdir: str, recorded: dict | None, current: dict,
                 step: int, allow_change: bool) -> dict:
  """Compares the config that trained the checkpoint of `step` with the
  current one. Returns the differences (empty if none); raises
  ConfigChanged unless allow_change, in which case the change is appended
  to config_history.jsonl with the step it takes effect at."""
  if recorded is None:
    return {}
  changes = differences(recorded, current)
  if changes and not allow_change:
    raise ConfigChanged(
        f'The config differs from the one that trained the checkpoint at '
        f'step {step} in {workdir}: {describe(changes)}. Use the same '
        'config, another --workdir, or --allow_config_change to record the '
        'change and continue.')
  if changes:
    with open(os.path.join(workdir, HISTORY_FILE), 'a') as f:
      f.write(json.dumps(dict(step=step, changes=changes)) + '\n')
  return changes


def write_config(workdir: str, config_dict: dict) -> None:
  """Replaces config.json atomically; on a full disk the temporary file is
  removed and the old config.json kept."""
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path + '.tmp', 'w') as f:
      json.dump(config_dict, f, indent=1)
    os.replace(path + '.tmp', path)
  except OSError as e:
    if os.path.lexists(path + '.tmp'):
      os.remove(path + '.tmp')
    if errors.is_disk_full(e):
      raise errors.UserError(
          f'No space left on the disk of {os.path.abspath(workdir)} while '
          f'writing {CONFIG_FILE}; free space and rerun the same '
          'command.') from None
    raise

"""Checkpoints with orbax: the train state (arrays) plus the data iterator state.

orbax writes each checkpoint into a temporary folder and renames it when
complete, so a process killed at any moment leaves the latest finished
checkpoint intact; unfinished temporary folders are never read back. No
pickle anywhere: arrays are stored by tensorstore, the iterator state as JSON.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
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


class Checkpointer:
  """Periodic checkpoints in <workdir>/checkpoints, keeping the last N."""

  def __init__(self, workdir: str, max_to_keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            cleanup_tmp_directories=True),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict | None) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {})))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state):
    """(state, data_state) of step; abstract_state gives structure, shapes
    and shardings. Raises CheckpointMismatchError naming what differs."""
    if step not in self.manager.all_steps():
      raise FileNotFoundError(
          f'No checkpoint for step {step} in {self.directory}; available: '
          f'{self.all_steps()}.')
    stored = self.manager.item_metadata(step)['state']
    stored = getattr(stored, 'tree', stored)
    mismatch = describe_mismatch(abstract_state['params'], stored['params'])
    if mismatch:
      raise CheckpointMismatchError(
          f'Checkpoint {self.directory} step {step} does not fit the '
          f'configured model: {mismatch}.')
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def to_host(tree):
  return jax.tree.map(np.asarray, tree)

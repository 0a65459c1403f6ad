"""Metrics to a JSON-lines file and TensorBoard event files (process 0).

Every record is {'step', 'kind', metrics...}. A resumed run first drops the
records of steps after its checkpoint (they will be recomputed), so
metrics.jsonl has one row per (kind, step) however often a run was killed,
and TensorBoard is told to purge the same steps.
"""

import json
import math
import os

import jax
import numpy as np


class MetricWriter:
  """Writes only on process 0. resume_step: the step training restarts
  from (0 for a fresh run)."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tensorboard = None
    if self.enabled:
      _truncate_after(self.path, resume_step)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tensorboard = SummaryWriter(
          os.path.join(workdir, 'tensorboard'), purge_step=resume_step + 1)

  def write(self, step: int, kind: str, metrics: dict) -> None:
    """kind: 'train', 'eval' or 'signal' (prefix of the TensorBoard tags)."""
    if not self.enabled:
      return
    values = {k: float(v) for k, v in metrics.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, 'kind': kind, **values}) + '\n')
    for name, value in values.items():
      if math.isfinite(value):
        self._tensorboard.add_scalar(f'{kind}/{name}', value, step)
    self._tensorboard.flush()

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    """image: uint8 [H, W, 3] (RGB)."""
    if self.enabled:
      self._tensorboard.add_image(tag, image, step, dataformats='HWC')
      self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def _truncate_after(path: str, step: int) -> None:
  """Keeps rows with step <= `step`, the last one of each (kind, step)."""
  if not os.path.exists(path):
    return
  rows = {}
  for row in read_metrics(os.path.dirname(path)):
    if row['step'] <= step:
      rows[(row['kind'], row['step'])] = row
  with open(path + '.tmp', 'w') as f:
    for row in sorted(rows.values(), key=lambda r: (r['step'], r['kind'])):
      f.write(json.dumps(row) + '\n')
  os.replace(path + '.tmp', path)


def read_metrics(workdir: str) -> list[dict]:
  """Every record of metrics.jsonl; a line cut by a kill is skipped."""
  rows = []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except ValueError:
        continue
  return rows


def last_eval(workdir: str, step: int) -> dict | None:
  """The eval metrics recorded at `step`, if any."""
  if not os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    return None
  rows = [r for r in read_metrics(workdir)
          if r['kind'] == 'eval' and r['step'] == step]
  if not rows:
    return None
  return {k: v for k, v in rows[-1].items() if k not in ('step', 'kind')}

"""Metrics to a JSON-lines file, TensorBoard event files and the console."""

import json
import math
import os

import jax


class MetricWriter:
  """Writes only on process 0; every record is {'step', 'kind', metrics...}."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tensorboard = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, kind: str, metrics: dict) -> None:
    """kind: 'train' or 'eval' (prefix of the TensorBoard tags)."""
    if not self.enabled:
      return
    values = {k: float(v) for k, v in metrics.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, 'kind': kind, **values}) + '\n')
    for name, value in values.items():
      if math.isfinite(value):
        self._tensorboard.add_scalar(f'{kind}/{name}', value, step)
    self._tensorboard.flush()
    shown = ' '.join(f'{k}={v:.4g}' for k, v in values.items())
    print(f'[{kind} step {step}] {shown}', flush=True)

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]

"""Evaluates a checkpoint with its plain and EMA parameters.

  python eval.py --config=configs/nf_resnet50.py --workdir=/tmp/nf50 \
      [--step=90000] [--split=validation]

Prints the metrics and writes <workdir>/eval_<split>_<step>.json.
"""

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

import experiment
from nfnets import checkpointing

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder with checkpoints/.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default latest.')
_SPLIT = flags.DEFINE_string('split', None,
                             'Split; default the config\'s eval_split.')


def main(argv):
  del argv
  config = _CONFIG.value
  split = _SPLIT.value or config.eval_split
  exp = experiment.Experiment(config)
  checkpointer = checkpointing.Checkpointer(_WORKDIR.value)
  step = _STEP.value if _STEP.value is not None else checkpointer.latest_step()
  if step is None:
    sys.exit(f'No checkpoint in {checkpointer.directory}.')
  try:
    state, _ = checkpointer.restore(step, exp.abstract_state())
  except (checkpointing.CheckpointMismatchError, FileNotFoundError) as e:
    sys.exit(str(e))
  finally:
    checkpointer.close()
  metrics = exp.evaluate_state(state, split)
  path = os.path.join(_WORKDIR.value, f'eval_{split}_{step}.json')
  with open(path, 'w') as f:
    json.dump({'step': step, 'split': split, **metrics}, f, indent=1)
  print(f'step {step} {split}: ' + ' '.join(
      f'{k}={v:.4f}' for k, v in metrics.items()))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)

"""Evaluates a checkpoint with its plain and EMA parameters (read-only).

  python eval.py --config=configs/nf_resnet50.py --workdir=/tmp/nf50 \
      [--step=90000] [--split=validation]

Prints the metrics and writes <workdir>/eval_<split>_<step>.json. Without
--step it evaluates the newest checkpoint that reads back, naming any newer
damaged one; it never creates, moves or deletes checkpoints.
"""

import json
import os

from absl import flags
from ml_collections import config_flags

import experiment
from nfnets import checkpointing
from nfnets import cli
from nfnets import errors
from nfnets import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder with checkpoints/.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default latest.')
_SPLIT = flags.DEFINE_string('split', None,
                             'Split; default the config\'s eval_split.')


def main(argv):
  del argv
  config = _CONFIG.value
  split = _SPLIT.value or config.eval_split
  workdir = _WORKDIR.value
  if not os.path.isdir(workdir):
    raise errors.UserError(f'workdir {workdir!r} does not exist.')
  exp = experiment.Experiment(config)
  checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
  config_dict = workdir_lib.config_to_dict(config)
  try:
    if _STEP.value is None:
      found = checkpointer.restore_latest_intact(
          exp.abstract_state(), warn=lambda line: print(line, flush=True),
          other_layouts=exp.other_layouts(), config_dict=config_dict)
      if found is None:
        raise errors.UserError(f'No checkpoint in {checkpointer.directory}.')
      step, state = found[0], found[1]
    else:
      step = _STEP.value
      try:
        state = checkpointer.restore(step, exp.abstract_state(),
                                     exp.other_layouts(),
                                     config_dict=config_dict)[0]
      except FileNotFoundError as e:
        raise errors.UserError(str(e)) from None
      except checkpointing.CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        raise checkpointing.CheckpointDamaged(
            f'Checkpoint step {step} in {checkpointer.directory} cannot be '
            f'read ({checkpointing.readable_reason(e)}); available steps: '
            f'{checkpointer.all_steps()}.') from None
  finally:
    checkpointer.close()
  metrics = exp.evaluate_state(state, split)
  path = os.path.join(workdir, f'eval_{split}_{step}.json')
  with open(path, 'w') as f:
    json.dump({'step': step, 'split': split, **metrics}, f, indent=1)
  print(f'step {step} {split}: ' + experiment.format_metrics(metrics))


if __name__ == '__main__':
  cli.run(main, required=['config', 'workdir'])

"""Evaluates a checkpoint with its plain and EMA parameters (read-only).

  python eval.py --config=configs/nf_resnet50.py --workdir=/tmp/nf50 \
      [--step=90000] [--split=validation]
  python eval.py --config=configs/nf_resnet50_timm.py \
      --weights=weights/nf_resnet50_timm.safetensors

Prints the metrics; with --workdir also writes
<workdir>/eval_<split>_<step>.json. Without --step it evaluates the newest
checkpoint that reads back, naming any newer damaged one; it never creates,
moves or deletes checkpoints. --weights evaluates a weights file
(nfnets/weights.py, e.g. converted timm weights) instead.
"""

import json
import os

from absl import flags
import jax
from ml_collections import config_flags

import experiment
from nfnets import checkpointing
from nfnets import cli
from nfnets import errors
from nfnets import weights
from nfnets import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder with checkpoints/.')
_WEIGHTS = flags.DEFINE_string(
    'weights', None, 'A weights file (*.safetensors) instead of --workdir.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default latest.')
_SPLIT = flags.DEFINE_string('split', None,
                             'Split; default the config\'s eval_split.')


def _weights_state(exp, path: str) -> dict:
  """The train-state parts eval needs, from a weights file, checked against
  the configured model."""
  loaded = weights.read(path)
  expected = exp.abstract_state()
  model = exp.config.model
  state = dict(bn_state=loaded.bn_state)
  for name in ('params', 'ema_params'):
    tree = getattr(loaded, name)
    if tree:
      state[name] = weights.in_model_layout(tree, model, expected['params'])
      weights.check_fits(loaded, model, expected['params'], state[name])
  state.setdefault('ema_params', {})
  print(f'Evaluating {loaded.source}.', flush=True)
  return jax.device_put(state, exp.replicated)


def main(argv):
  del argv
  config = _CONFIG.value
  split = _SPLIT.value or config.eval_split
  workdir = _WORKDIR.value
  if (workdir is None) == (_WEIGHTS.value is None):
    raise errors.UserError('Give exactly one of --workdir and --weights.')
  if _WEIGHTS.value is not None and _STEP.value is not None:
    raise errors.UserError('--step selects a checkpoint of --workdir; a '
                           'weights file has one set of weights.')
  if _WEIGHTS.value is not None:
    exp = experiment.Experiment(config)
    metrics = exp.evaluate_state(_weights_state(exp, _WEIGHTS.value), split)
    print(f'{split}: ' + experiment.format_metrics(metrics))
    return
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
  cli.run(main, required=['config'])

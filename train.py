"""Trains a model from a config, resuming from the latest checkpoint.

  python train.py --config=configs/nf_resnet50.py --workdir=/tmp/nf50 \
      --config.model.alpha=0.4 --config.train.batch_size=512
"""

import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

import experiment
from nfnets import checkpointing

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints and metrics.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() (multi-host).')


def main(argv):
  del argv
  if _DISTRIBUTED.value:
    # Cross-process collectives on CPU need gloo; GPU and TPU ignore this.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize()
  try:
    metrics = experiment.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (experiment.TrainingDiverged,
          checkpointing.CheckpointMismatchError) as e:
    print(f'Training stopped: {e}', file=sys.stderr)
    sys.exit(1)
  print('final eval: ' + ' '.join(f'{k}={v:.4f}' for k, v in metrics.items()))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)

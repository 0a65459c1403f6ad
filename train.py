"""Trains a model from a config, resuming from the newest intact checkpoint.

  python train.py --config=configs/nf_resnet50.py --workdir=/tmp/nf50 \
      --config.model.alpha=0.4 --config.train.batch_size=512

Exit codes: 0 done, 2 a mistake to fix (message on stderr), 3 diverged,
143 / 130 stopped by SIGTERM / Ctrl-C after writing a checkpoint (rerun the
same command to resume).
"""

from absl import flags
import jax
from ml_collections import config_flags

import experiment
from nfnets import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints and metrics.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() (multi-host).')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False,
    'Resume although the config differs from the one that trained the '
    'checkpoints; the change is recorded in config_history.jsonl.')


def main(argv):
  del argv
  experiment.use_deterministic_kernels(_CONFIG.value)
  if _DISTRIBUTED.value:
    # Cross-process collectives on CPU need gloo; GPU and TPU ignore this.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize()
  log = print if jax.process_index() == 0 else (lambda *_: None)
  experiment.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                _ALLOW_CONFIG_CHANGE.value,
                                log=lambda line: log(line, flush=True))


if __name__ == '__main__':
  cli.run(main, required=['config', 'workdir'])

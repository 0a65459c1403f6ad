"""Train-step images/s of ImageNet models on the available devices.

Uses the real experiment (jitted shard_map step, SGD + Nesterov, weight
decay, label smoothing) on fake uint8 batches already in host memory, so the
number is the step alone.

  python benchmarks/train_step.py --configs=nf_resnet50,bn_resnet50 \
      --batch=32 --image_size=224 --steps=3
"""

import os
import sys
import time

from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import experiment  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_loop  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import errors  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIGS = flags.DEFINE_list('configs', ['nf_resnet50', 'bn_resnet50'],
                             'Config modules under configs/.')
_BATCH = flags.DEFINE_integer('batch', 32, 'Global batch size.')
_SIZE = flags.DEFINE_integer('image_size', 224, 'Image size, px.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps (after 1 warm-up).')
_DTYPE = flags.DEFINE_string('compute_dtype', 'float32', 'float32/bfloat16.')


def _config(name: str):
  """configs/<name>.py on fake data at the flags' size, batch and dtype;
  UserError naming any bad value."""
  config = train_loop.load_config(name)
  config.data.update(dict(name='fake', image_size=_SIZE.value,
                          num_workers=0))
  config.train.update(dict(batch_size=_BATCH.value,
                           eval_batch_size=_BATCH.value, steps=1000))
  config.compute_dtype = _DTYPE.value
  experiment.validate_config(config)
  return config


def main(argv):
  del argv
  if _STEPS.value < 1:
    raise errors.UserError(f'--steps must be >= 1, got {_STEPS.value}.')
  configs = {name: _config(name) for name in _CONFIGS.value}  # checks first
  print(f'devices: {jax.devices()}')
  for name, config in configs.items():
    exp = experiment.Experiment(config)
    state = exp.init_state()
    rng = np.random.default_rng(0)
    batch = {'images': rng.integers(0, 256, (_BATCH.value, _SIZE.value,
                                             _SIZE.value, 3), dtype=np.uint8),
             'labels': rng.integers(0, config.model.num_classes,
                                    (_BATCH.value,), dtype=np.int32)}
    start = time.time()
    state, metrics = exp.train_step(state, batch)
    jax.block_until_ready(metrics)
    compile_seconds = time.time() - start
    start = time.time()
    for _ in range(_STEPS.value):
      state, metrics = exp.train_step(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.time() - start) / _STEPS.value
    print(f'{name}: {_BATCH.value / seconds:.2f} images/s '
          f'({seconds:.2f} s/step, batch {_BATCH.value}, {_SIZE.value} px, '
          f'{_DTYPE.value}; first step incl. compile {compile_seconds:.0f} s)',
          flush=True)


if __name__ == '__main__':
  cli.run(main)

"""Train-step images/s of ImageNet models on the available devices.

Uses the real experiment (jitted shard_map step, SGD + Nesterov, weight
decay, label smoothing) on fake uint8 batches already in host memory, so the
number is the step alone.

  python -m benchmarks.train_step --configs=nf_resnet50,bn_resnet50 \
      --batch=32 --image_size=224 --steps=3
"""

from absl import flags
import jax

from benchmarks import harness
from nfnets import cli
from nfnets import errors

_CONFIGS = flags.DEFINE_list('configs', ['nf_resnet50', 'bn_resnet50'],
                             'Config modules under configs/.')
_BATCH = flags.DEFINE_integer('batch', 32, 'Global batch size.')
_SIZE = flags.DEFINE_integer('image_size', 224, 'Image size, px.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps (after 1 warm-up).')
_DTYPE = flags.DEFINE_string('compute_dtype', 'float32', 'float32/bfloat16.')


def main(argv):
  del argv
  if _STEPS.value < 1:
    raise errors.UserError(f'--steps must be >= 1, got {_STEPS.value}.')
  configs = {name: harness.fake_config(harness.load_config(name), _BATCH.value,
                                       _SIZE.value, _DTYPE.value)
             for name in _CONFIGS.value}  # every check before compiling
  print(f'devices: {jax.devices()}')
  for name, config in configs.items():
    step = harness.TrainStep(config)
    compile_seconds = step.train(1)
    seconds = step.train(_STEPS.value) / _STEPS.value
    print(f'{name}: {_BATCH.value / seconds:.2f} images/s '
          f'({seconds:.2f} s/step, batch {_BATCH.value}, {_SIZE.value} px, '
          f'{_DTYPE.value}; first step incl. compile {compile_seconds:.0f} s)',
          flush=True)


if __name__ == '__main__':
  cli.run(main)

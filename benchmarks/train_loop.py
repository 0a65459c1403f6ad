"""The real training loop against the train step alone: is the loop
input- or host-bound?

For each config, times (1) the compiled train step on one batch already on
the devices and (2) `experiment.train_and_evaluate` itself (data pipeline,
prefetch, transfer, step, logging) in a temporary workdir, whose logged
images/s exclude compilation, evaluation and checkpoints. Step, loop, step
are run in turn and the two step timings averaged, since machines drift.

  python -m benchmarks.train_loop                         # quickstart, CPU
  python -m benchmarks.train_loop --configs=nf_resnet50 --data=fake \
      --batch=256 --image_size=224 --steps=100            # on a GPU
"""

from absl import flags
import jax

import experiment
from benchmarks import harness
from nfnets import cli

_CONFIGS = flags.DEFINE_list('configs', ['quickstart'],
                             'Config modules under configs/.')
_DATA = flags.DEFINE_string('data', '', "'' = the config's data; 'fake' = "
                            'random uint8 images of --image_size.')
_BATCH = flags.DEFINE_integer('batch', 0, 'Global batch; 0 = the config\'s.')
_SIZE = flags.DEFINE_integer('image_size', 0, 'px; 0 = the config\'s.')
_STEPS = flags.DEFINE_integer('steps', 300, 'Timed steps per measurement.')
_WORKERS = flags.DEFINE_integer('num_workers', -1,
                                'grain workers; -1 = the config\'s.')


def _config(name: str):
  config = harness.load_config(name)
  if _DATA.value:
    config.data.name = _DATA.value
    config.data.fake_train_size = 1024
    config.data.fake_eval_size = 256
  if _SIZE.value:
    config.data.image_size = _SIZE.value
  if _BATCH.value:
    config.train.batch_size = _BATCH.value
    config.train.eval_batch_size = _BATCH.value
  if _WORKERS.value >= 0:
    config.data.num_workers = _WORKERS.value
  harness.set_loop_steps(config, _STEPS.value)
  experiment.validate_config(config)
  return config


def main(argv):
  del argv
  configs = {name: _config(name) for name in _CONFIGS.value}
  steps = _STEPS.value
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind}; '
        f'{steps} timed steps each; step, loop, step in turn')
  print(f'{"config":<14} {"batch":>5} {"px":>4} {"data":<8} {"workers":>7} '
        f'{"step img/s":>11} {"loop img/s":>11} {"ratio":>6} {"data wait":>9}')
  for name, config in configs.items():
    first = harness.time_loop_step(config, steps).images_per_second
    loop, wait = harness.loop_images_per_second(config)
    second = harness.time_loop_step(config, steps).images_per_second
    step = (first + second) / 2
    print(f'{name:<14} {config.train.batch_size:>5} '
          f'{config.data.image_size:>4} {config.data.name:<8} '
          f'{config.data.num_workers:>7} {step:>11,.0f} {loop:>11,.0f} '
          f'{loop / step:>6.2f} {100 * wait:>8.0f}%', flush=True)


if __name__ == '__main__':
  cli.run(main)

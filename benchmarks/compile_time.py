"""Compile time and step time of deep ResNets, scanned against unrolled.

For each variant, builds the real experiment (jitted shard_map train step,
SGD + Nesterov) with model.block_loop 'unrolled' and 'scan' in turn and
times: the init (trace + compile + run), the ahead-of-time compilation of
the train step, and the median step over --steps steps on one fake batch
(after one untimed step).
The loops' steps are timed alternately (the order flipping every round),
so a busy machine slows both alike. The persistent compilation cache is
off, so every compile is real.

  python -m benchmarks.compile_time --variants=ResNet50,ResNet288,ResNet600 \
      --batch=8 --image_size=64 --steps=3
"""

import statistics

from absl import flags
import jax

from benchmarks import harness
from nfnets import cli
from nfnets import errors
from nfnets import resnet

_VARIANTS = flags.DEFINE_list('variants', ['ResNet288', 'ResNet600'],
                              f'Keys of resnet.VARIANTS: {list(resnet.VARIANTS)}.')
_LOOPS = flags.DEFINE_list('loops', ['unrolled', 'scan'],
                           'model.block_loop values, timed in this order.')
_MODEL = flags.DEFINE_string('model', 'nf_resnet', f'One of {resnet.MODELS}.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Global batch size.')
_SIZE = flags.DEFINE_integer('image_size', 64, 'Image size, px.')
_STEPS = flags.DEFINE_integer('steps', 3,
                             'Timed steps per loop (after one untimed).')


def _config(variant: str, loop: str):
  """nf_resnet50's recipe for this model, variant and block loop, on fake
  data; UserError naming any bad value."""
  config = harness.load_config('nf_resnet50')
  config.model.update(dict(name=_MODEL.value, variant=variant,
                           block_loop=loop))
  return harness.fake_config(config, _BATCH.value, _SIZE.value)


def _check_flags() -> None:
  """Validates every config before anything is compiled."""
  if _STEPS.value < 1:
    raise errors.UserError(f'--steps must be >= 1, got {_STEPS.value}.')
  for loop in _LOOPS.value:
    if loop == 'auto' or loop not in resnet.BLOCK_LOOPS:
      raise errors.UserError(f'Unknown loop {loop!r} in --loops; allowed: '
                             "'unrolled', 'scan'.")
  for variant in _VARIANTS.value:
    _config(variant, _LOOPS.value[0])


def measure(variant: str) -> dict:
  """{loop: {init, compile, step (median seconds), loss}}; the loops' steps
  are timed alternately, the order flipping every round."""
  runs = {}
  for loop in _LOOPS.value:
    runs[loop] = harness.LoopStep(_config(variant, loop))
    jax.block_until_ready(runs[loop].step())  # untimed
  seconds = harness.alternate(
      _STEPS.value, [variant], _LOOPS.value,
      lambda _, loop: harness.time_calls(runs[loop].step, 1))
  return {loop: dict(init=run.init_seconds, compile=run.compile_seconds,
                     step=statistics.median(seconds[variant, loop]),
                     loss=run.mean_loss())
          for loop, run in runs.items()}


def main(argv):
  del argv
  jax.config.update('jax_enable_compilation_cache', False)
  _check_flags()
  print(f'{_MODEL.value}, batch {_BATCH.value}, {_SIZE.value} px, float32, '
        f'{jax.device_count()} {jax.devices()[0].platform} device(s), '
        f'{harness.cpu_count()} CPUs, XLA_FLAGS={harness.xla_flags()}',
        flush=True)
  print(harness.markdown_table(['variant', 'blocks', 'block_loop', 'init s',
                                'train-step compile s', 'step s', 'loss']),
        flush=True)
  for variant in _VARIANTS.value:
    blocks = sum(resnet.VARIANTS[variant])
    for loop, result in measure(variant).items():
      print(harness.table_row([
          variant, blocks, loop, f'{result["init"]:.1f}',
          f'{result["compile"]:.1f}', f'{result["step"]:.2f}',
          f'{result["loss"]:.4f}']), flush=True)


if __name__ == '__main__':
  cli.run(main)

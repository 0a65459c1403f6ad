"""Why the Scaled-WS residual variance falls in the last stages: a measurement.

Hypothesis: SAME zero padding. A 3x3 conv at a border pixel sees zeros in
place of some of its 9 taps, so its output has less variance there; the
share of such taps grows as the feature map shrinks (1 - ((3s - 2) / 3s)^2
for an s x s map: 8.2% at 16 x 16, 1.0% at 128 x 128).

Test: measure the alpha = 1 NF-ResNet-600 (Scaled WS, ReLU, as in Figure 2)
at several input sizes, so every stage runs at several feature-map sizes,
(1) with the model's SAME zero padding and (2) with every conv padded
circularly instead (same weights, same inputs; a conv then sees real values
in all taps everywhere). If padding is the cause, the residual variance
depends on the feature-map side, not on the stage, and circular padding
brings it back to 1 in every stage.

  python docs/spp/stage4.py            # about 3-5 minutes on 2 CPU cores
Writes docs/spp/stage4.txt.
"""

import os
import sys
import time

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
from nfnets import layers  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import resnet  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import spp  # pylint: disable=g-import-not-at-top,wrong-import-position

IMAGE_SIZES = (64, 128)  # 512 px (zero padding) is docs/spp/fig2_summary.txt
BATCH_SIZE = 8
CONFIG = resnet.make_config(variant='ResNet600', alpha=1.0, skip_gain_init=1.0)
OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'stage4.txt')


def circular_padding(next_fn, args, kwargs, context):
  """Haiku interceptor: SAME convs padded circularly instead of with zeros."""
  module = context.module
  if (context.method_name != '__call__'
      or not isinstance(module, (layers.WSConv2D, layers.Conv2D))
      or module.kernel_shape == (1, 1)):
    return next_fn(*args, **kwargs)
  x = args[0]
  pads = jax.lax.padtype_to_pads(x.shape[1:3], module.kernel_shape,
                                 module.stride, 'SAME')
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)), mode='wrap')
  module.padding = 'VALID'
  try:
    return next_fn(x, *args[1:], **kwargs)
  finally:
    module.padding = 'SAME'


def measure(image_size: int, padding: str) -> np.ndarray:
  """Mean residual variance per stage [4] at this input size and padding."""

  def forward(images):
    model = resnet.ResNet(CONFIG, name='resnet')
    if padding == 'circular':
      with hk.intercept_methods(circular_padding):
        return model(images, True, True)[1]
    return model(images, True, True)[1]

  result = spp.measure_function(
      f'{padding}{image_size}', forward, image_size, BATCH_SIZE,
      stage_depths=resnet.stage_depths(CONFIG), jit=False, init_image_size=32)
  stages = np.array([spec.stage for spec in result.plan])
  print(f'{image_size} px, {padding}: {result.seconds:.0f} s', flush=True)
  return np.array([result.residual_variance[stages == s].mean()
                   for s in range(4)])


def zero_tap_share(side: int) -> float:
  """Share of a 3x3 SAME conv's taps that fall on padding, s x s map."""
  return 1 - ((3 * side - 2) / (3 * side))**2


def main():
  start = time.time()
  rows = {(size, padding): measure(size, padding)
          for size in IMAGE_SIZES for padding in ('zero', 'circular')}
  lines = ['Mean residual variance per stage (feature-map side in px), '
           'alpha = 1 NF-ResNet-600, Scaled WS, ReLU, batch '
           f'{BATCH_SIZE}, seed 0',
           f'{"input":>6} {"padding":>9} ' + ' '.join(
               f'{"stage " + str(s + 1):>14}' for s in range(4))]
  for (size, padding), values in rows.items():
    sides = [size // 4 // 2**s for s in range(4)]
    lines.append(f'{size:>6} {padding:>9} ' + ' '.join(
        f'{v:>8.3f} ({side:>3})' for v, side in zip(values, sides)))
  by_side = {}
  for (size, padding), values in rows.items():
    if padding == 'zero':
      for s, value in enumerate(values):
        by_side.setdefault(size // 4 // 2**s, []).append((s + 1, value))
  lines += ['', 'Zero padding, by feature-map side: (stage, mean residual '
            'variance) ... and the share of 3x3 taps on padding']
  for side in sorted(by_side, reverse=True):
    entries = ', '.join(f'stage {s}: {v:.3f}' for s, v in by_side[side])
    lines.append(f'{side:>4} x {side:<4} {entries}   '
                 f'zero taps {100 * zero_tap_share(side):.1f}%')
  lines.append(f'({time.time() - start:.0f} s)')
  text = '\n'.join(lines)
  print(text)
  with open(OUTPUT, 'w') as f:
    f.write(text + '\n')


if __name__ == '__main__':
  main()

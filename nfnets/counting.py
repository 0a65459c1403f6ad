"""Parameter and multiply-add counts of any model of nfnets.models.

Multiply-adds (MACs) are counted analytically from the shapes of every
convolution and linear layer, traced with jax.eval_shape (nothing is
computed, so ResNet-600 at 512 px costs a second). FLOPs ~= 2 * MACs; the
tests check this against XLA's own cost analysis.

Run `python -m nfnets.counting` for the tables of every NF-ResNet variant and
every NF-RegNet variant (at its train and test resolutions).
"""

import copy
import math

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets import layers
from nfnets import models
from nfnets import regnet
from nfnets import resnet


def count_params(params) -> int:
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def _layer_macs(module, inputs, output) -> int:
  """Multiply-adds per example of one conv or linear call."""
  if isinstance(module, (layers.WSConv2D, layers.Conv2D)):
    kh, kw = module.kernel_shape
    in_per_group = inputs.shape[-1] // module.feature_group_count
    return math.prod(output.shape[1:]) * kh * kw * in_per_group
  if isinstance(module, hk.Linear):
    return inputs.shape[-1] * output.shape[-1]
  return 0


def count_params_and_macs(config, image_size: int) -> tuple[int, int]:
  """(parameter count, multiply-adds per image) at image_size x image_size."""
  models.validate_config(config)
  models.check_image_size(config, image_size)
  if config.get('block_loop', 'unrolled') != 'unrolled':
    # A scan traces one block per stage: count the blocks one by one.
    config = copy.deepcopy(config)
    config.block_loop = 'unrolled'
  model = models.build(config)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  macs = []

  def record(next_fn, args, kwargs, context):
    output = next_fn(*args, **kwargs)
    if context.method_name == '__call__':
      macs.append(_layer_macs(context.module, args[0], output))
    return output

  def init(rng, images):
    with hk.intercept_methods(record):
      return model.init(rng, images, is_training=True)

  params, _ = jax.eval_shape(init, jax.random.key(0), images)
  return count_params(params), sum(macs)


def variant_table(image_size: int = 224, **overrides) -> str:
  """Parameters and GMACs of every NF-ResNet variant at width 1."""
  lines = [f'NF-ResNet at {image_size} px '
           f'({", ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"})',
           f'{"variant":<10} {"depths":<18} {"params (M)":>10} {"GMACs":>8} '
           f'{"GFLOPs":>8}']
  for variant, depths in resnet.VARIANTS.items():
    config = resnet.make_config(variant=variant, **overrides)
    params, macs = count_params_and_macs(config, image_size)
    lines.append(f'{variant:<10} {str(depths):<18} {params / 1e6:>10.3f} '
                 f'{macs / 1e9:>8.3f} {2 * macs / 1e9:>8.3f}')
  return '\n'.join(lines)


def regnet_variant_table(**overrides) -> str:
  """Parameters and GMACs of NF-RegNet-B0..B8 at their train and test px.

  The paper's and EfficientNet's "FLOPs" are multiply-adds (the reference
  code counts one per multiply-add): compare them with the GMACs columns.
  """
  setting = ', '.join(f'{k}={v}' for k, v in overrides.items())
  lines = [f'NF-RegNet ({setting or "defaults: reference widths x 0.75"}), '
           'GMACs per image at the train and test resolutions',
           f'{"variant":<8} {"depths":<16} {"params (M)":>10} {"train px":>8} '
           f'{"GMACs":>7} {"test px":>8} {"GMACs":>7}']
  for variant, shape in regnet.VARIANTS.items():
    config = regnet.make_config(variant=variant, **overrides)
    params, train_macs = count_params_and_macs(config, shape.train_image_size)
    _, test_macs = count_params_and_macs(config, shape.test_image_size)
    lines.append(f'{variant:<8} {str(shape.depths):<16} {params / 1e6:>10.3f} '
                 f'{shape.train_image_size:>8} {train_macs / 1e9:>7.3f} '
                 f'{shape.test_image_size:>8} {test_macs / 1e9:>7.3f}')
  return '\n'.join(lines)


if __name__ == '__main__':
  print(variant_table())
  print()
  print(regnet_variant_table())

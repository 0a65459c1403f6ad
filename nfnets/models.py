"""One entry point over every model family: config.name picks the module.

Each family module (nfnets.resnet, nfnets.regnet) provides, for its model names:
  build(config) -> hk.TransformedWithState
      init(rng, images, is_training) -> (params, state)
      apply(params, state, rng, images, is_training, return_stats=False,
            return_features=False)
        -> (logits, new_state); with a flag set, the first element is the
           tuple (logits, stats, features) less what was not asked for
  build_backbone(config) -> hk.TransformedWithState without the classifier
      apply(params, state, rng, images, is_training) -> (features, new_state)
      features: {'stem', 'stage1'..'stage4', 'final', 'pooled'}, shapes and
      meaning in docs/backbone.md
  validate_config(config)            raises ValueError naming the value
  total_stride(config) -> int        how much the network downsamples
  block_plan(config) -> list of BlockSpec-like records (index, stage,
      is_transition, is_stage_end, expected_std) for signal statistics.
and, where parameters have more than one stored layout (nfnets.resnet's
block_loop):
  other_layouts(config) -> [(to_other, back)], functions on trees
experiment.py, spp.py and counting.py go through this module only.
"""

from typing import Callable

from nfnets import layers
from nfnets import regnet
from nfnets import resnet

_FAMILIES = (resnet, regnet)


def names() -> tuple[str, ...]:
  """Every model name that config.name accepts."""
  return tuple(name for family in _FAMILIES for name in family.MODELS)


def family(config):
  """The module that builds config.name; ValueError for an unknown name."""
  for module in _FAMILIES:
    if config.name in module.MODELS:
      return module
  raise ValueError(f'Unknown model {config.name!r}; allowed: {names()}.')


def validate_config(config) -> None:
  family(config).validate_config(config)


def check_image_size(config, height: int, width: int | None = None) -> None:
  """Raises ValueError if the image is smaller than the network's total
  stride (px)."""
  layers.check_image_size(family(config).total_stride(config), height, width)


def build(config):
  return family(config).build(config)


def build_backbone(config):
  """config's network without its classifier, returning the feature dict
  (docs/backbone.md); it takes the parameters of build(config) as they are."""
  return family(config).build_backbone(config)


def block_plan(config) -> list:
  return family(config).block_plan(config)


def other_layouts(config) -> list[tuple[Callable, Callable]]:
  """The other layouts a checkpoint of config's network may be stored in:
  [(to_other, back)], functions on any tree holding its Haiku dicts (a
  ResNet with scanned blocks stores them stacked, see nfnets/stacking.py).
  Empty for families with one layout."""
  layouts = getattr(family(config), 'other_layouts', None)
  return layouts(config) if layouts else []

"""NF-RegNets B0-B8 (paper Section 5): Normalizer-Free RegNet-style networks.

Model (config.name): 'nf_regnet'.

  stem     3x3 stride-2 Scaled-WS conv to int(widths[0] * width) channels
           (stride 1 with stem='cifar').
  blocks   four stages; the first block of every stage has stride 2. Each
           block computes h = act(x / beta), beta = expected_std (or the
           reference code's act(x) / beta, beta_placement), then
             branch = conv2_1x1(act(SE(conv1_3x3_grouped(act(conv0_1x1(h))))))
             shortcut = conv_1x1(avg_pool_2x2(h))  if strided
                        conv_1x1(h)                 on a channel change
                        x                           otherwise
             out = shortcut + alpha * skip_gain * stochastic_depth(branch)
           conv0 expands the block's input channels by `expansion` (1 for the
           network's very first block), rounded down to a multiple of the
           group width; the 3x3 conv is grouped with `group_width` channels
           per group; squeeze-excite acts on the expanded width.
  head     1x1 Scaled-WS conv to 1280 * C / 440 channels (C: last stage),
           act, global average pool, dropout, linear classifier init zero.

Every conv is Scaled-WS (nfnets.layers.WSConv2D); act is the configured
nonlinearity times its gamma (nfnets.activations). The layout follows the
authors' reference code (nfnets/nf_regnet.py in deepmind-research).

Expected variance (beta): 1 after the stem; every block adds alpha^2; the
first block of a stage is a transition (stride 2, shortcut conv fed the
rescaled input), after which the variance is 1 + alpha^2. This is the
bookkeeping nfnets.spp.expected_variances computes from block_plan.
"""

import dataclasses
import math

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections

from nfnets import activations
from nfnets import errors
from nfnets import layers
from nfnets import signal_stats


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the reference NF-RegNet table (widths before `width`)."""
  widths: tuple[int, int, int, int]   # output channels per stage
  depths: tuple[int, int, int, int]   # blocks per stage
  train_image_size: int               # px
  test_image_size: int                # px
  dropout_rate: float                 # before the classifier


MODELS = ('nf_regnet',)
# Reference nf_regnet_params (deepmind-research nfnets/base.py).
VARIANTS = {
    'B0': Variant((48, 104, 208, 440), (1, 3, 6, 6), 192, 224, 0.2),
    'B1': Variant((48, 104, 208, 440), (2, 4, 7, 7), 224, 256, 0.2),
    'B2': Variant((56, 112, 232, 488), (2, 4, 8, 8), 240, 272, 0.3),
    'B3': Variant((56, 128, 248, 528), (2, 5, 9, 9), 288, 320, 0.3),
    'B4': Variant((64, 144, 288, 616), (2, 6, 11, 11), 320, 384, 0.4),
    'B5': Variant((80, 168, 336, 704), (3, 7, 14, 14), 384, 456, 0.4),
    'B6': Variant((88, 184, 376, 792), (3, 8, 16, 16), 448, 528, 0.5),
    'B7': Variant((96, 208, 416, 880), (4, 10, 19, 19), 512, 600, 0.5),
    'B8': Variant((104, 232, 456, 968), (4, 11, 22, 22), 600, 672, 0.5),
}
NUM_STAGES = 4
STAGE_STRIDE = 2          # first block of every stage, stage 1 included
# Stem conv stride: 'imagenet' the reference 3x3/2 conv; 'cifar' 3x3/1, so
# stage 1 sees a 32 x 32 image whole.
STEM_STRIDES = {'imagenet': 2, 'cifar': 1}
# Head conv: 1280 channels for 440 last-stage channels (EfficientNet-B0's
# 1280-wide head), scaled with the last stage's width.
HEAD_CHANNELS = 1280
HEAD_REFERENCE_CHANNELS = 440
# EfficientNet's first block does not expand its input.
FIRST_BLOCK_EXPANSION = 1.0


def default_config() -> ml_collections.ConfigDict:
  """Every model option with its default; the defaults build NF-RegNet-B0."""
  return ml_collections.ConfigDict(dict(
      name='nf_regnet',          # one of MODELS
      variant='B0',              # a key of VARIANTS
      widths=(),                 # explicit stage widths; overrides variant
      depths=(),                 # explicit stage depths; overrides variant
      width=0.75,                # multiplier on widths (reference: 0.75)
      num_classes=1000,
      activation='silu',         # a name in activations.ACTIVATIONS
      # Multiplier on the activation; None = gamma(activation).
      activation_gamma=ml_collections.FieldReference(None, field_type=float),
      alpha=0.2,                 # residual-branch scale
      # The branch input: act(x / beta) ('before_activation', the paper) or
      # act(x) / beta ('after_activation', the authors' code); they differ
      # for silu (nfnets.layers.nf_branch_input).
      beta_placement='before_activation',
      stem='imagenet',           # a key of STEM_STRIDES
      skip_gain_init=0.0,        # 0 to train (SkipInit), 1 for SPPs
      expansion=2.25,            # expanded / input channels of every block
      group_width=8,             # channels per group of the 3x3 conv
      use_se=True,               # squeeze-excite on the expanded width
      se_ratio=0.5,              # SE hidden / expanded channels
      se_activation='relu',      # SE hidden nonlinearity, unscaled (reference)
      stochastic_depth_rate=0.1, # rate of the last block; grows linearly
      # Divide kept branches by the keep rate; the reference does not (and
      # nfnets.resnet does by default).
      stochastic_depth_scale_by_keep=False,
      # Before the classifier; None = the variant's rate.
      dropout_rate=ml_collections.FieldReference(None, field_type=float),
      ws_eps=1e-4,               # floor on fan_in * Var(W)
      # Unused (no BatchNorm); experiment.py sets it on every model config.
      bn_axis_name=None,
  ))


def make_config(**overrides) -> ml_collections.ConfigDict:
  config = default_config()
  config.update(overrides)
  return config


def stage_widths(config) -> tuple[int, ...]:
  """Stage widths before the `width` multiplier."""
  return tuple(config.widths) if config.widths else VARIANTS[
      config.variant].widths


def stage_depths(config) -> tuple[int, ...]:
  return tuple(config.depths) if config.depths else VARIANTS[
      config.variant].depths


def dropout_rate(config) -> float:
  """config.dropout_rate, or the variant's rate when it is None."""
  if config.dropout_rate is not None:
    return config.dropout_rate
  if config.variant in VARIANTS:
    return VARIANTS[config.variant].dropout_rate
  return 0.0


def _positive_ints(values, count: int) -> bool:
  return len(values) == count and all(
      isinstance(v, int) and v >= 1 for v in values)


def validate_config(config) -> None:
  """Raises ValueError naming the bad value and what is allowed."""
  if config.name not in MODELS:
    raise ValueError(f'Unknown model {config.name!r}; allowed: {MODELS}.')
  if not (config.widths and config.depths) and config.variant not in VARIANTS:
    raise ValueError(f'Unknown variant {config.variant!r}; allowed: '
                     f'{tuple(VARIANTS)} (or set both widths and depths).')
  for field, values in (('widths', stage_widths(config)),
                        ('depths', stage_depths(config))):
    if not _positive_ints(tuple(values), NUM_STAGES):
      raise ValueError(f'{field} must be {NUM_STAGES} positive integers, got '
                       f'{tuple(values)}.')
  activations.canonical_name(config.activation)
  activations.canonical_name(config.se_activation)
  if config.activation_gamma is not None and not config.activation_gamma > 0:
    raise ValueError(
        f'activation_gamma must be > 0 (or None), got {config.activation_gamma}.')
  for field in ('alpha', 'width', 'expansion', 'se_ratio'):
    if not config[field] > 0:
      raise ValueError(f'{field} must be > 0, got {config[field]}.')
  if not (isinstance(config.group_width, int) and config.group_width >= 1):
    raise ValueError(f'group_width must be an integer >= 1, got '
                     f'{config.group_width}.')
  if not (isinstance(config.num_classes, int) and config.num_classes >= 1):
    raise ValueError(f'num_classes must be an integer >= 1, got '
                     f'{config.num_classes}.')
  if not 0 <= config.stochastic_depth_rate < 1:
    raise ValueError(f'stochastic_depth_rate must be in [0, 1), got '
                     f'{config.stochastic_depth_rate}.')
  if config.dropout_rate is not None and not 0 <= config.dropout_rate < 1:
    raise ValueError(f'dropout_rate must be in [0, 1) (or None), got '
                     f'{config.dropout_rate}.')
  if config.beta_placement not in layers.BETA_PLACEMENTS:
    raise ValueError(f'Unknown beta_placement {config.beta_placement!r}; '
                     f'allowed: {layers.BETA_PLACEMENTS}.')
  if config.stem not in STEM_STRIDES:
    raise ValueError(f'Unknown stem {config.stem!r}; allowed: '
                     f'{tuple(STEM_STRIDES)}.')
  if stem_channels(config) < 1:
    raise ValueError(f'width={config.width} leaves the stem with no channels.')


def total_stride(config) -> int:
  """How much the network downsamples: the stem, then every stage."""
  return STEM_STRIDES[config.stem] * STAGE_STRIDE**NUM_STAGES



def _scaled(channels: int, width: float) -> int:
  # The reference truncates (int), e.g. 0.75 * 104 = 78.
  return int(channels * width)


def stem_channels(config) -> int:
  return _scaled(stage_widths(config)[0], config.width)


def head_channels(config) -> int:
  last = _scaled(stage_widths(config)[-1], config.width)
  return max(1, HEAD_CHANNELS * last // HEAD_REFERENCE_CHANNELS)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Static layout of one NF-RegNet block."""
  index: int              # 0-based over the whole network
  stage: int              # 0-based
  in_channels: int
  out_channels: int
  expanded_channels: int  # conv0 output = grouped conv width
  groups: int             # feature groups of the 3x3 conv
  se_hidden_channels: int
  stride: int
  is_transition: bool     # stride > 1 or channel change: 1x1 shortcut conv
  is_stage_end: bool
  expected_std: float     # analytic std of the block input; beta = 1 / it
  drop_rate: float        # stochastic depth rate of this block


def block_plan(config) -> list[BlockSpec]:
  """Every block of the network, in order, with its expected input std.

  Expected variance: 1 after the stem, + alpha^2 per block, and 1 + alpha^2
  after a transition block (every stage's first block, stride 2), so
  nfnets.spp.expected_variances reproduces it from these records.
  """
  depths = stage_depths(config)
  num_blocks = sum(depths)
  in_channels = stem_channels(config)
  expected_var = 1.0
  plan = []
  for stage, (depth, stage_width) in enumerate(zip(depths,
                                                   stage_widths(config))):
    out_channels = _scaled(stage_width, config.width)
    if out_channels < 1:
      raise ValueError(f'width={config.width} leaves stage {stage + 1} '
                       f'(width {stage_width}) with no channels.')
    for i in range(depth):
      index = len(plan)
      expansion = FIRST_BLOCK_EXPANSION if index == 0 else config.expansion
      # Whole groups only; at least one group for very narrow test networks.
      groups = max(1, int(in_channels * expansion) // config.group_width)
      expanded = groups * config.group_width
      stride = STAGE_STRIDE if i == 0 else 1
      is_transition = stride > 1 or in_channels != out_channels
      plan.append(BlockSpec(
          index=index, stage=stage, in_channels=in_channels,
          out_channels=out_channels, expanded_channels=expanded,
          groups=groups,
          se_hidden_channels=max(1, int(expanded * config.se_ratio)),
          stride=stride, is_transition=is_transition,
          is_stage_end=(i == depth - 1), expected_std=math.sqrt(expected_var),
          drop_rate=config.stochastic_depth_rate * index / num_blocks))
      expected_var = (1.0 if is_transition else expected_var) + config.alpha**2
      in_channels = out_channels
  return plan


class NFRegNet(hk.Module):
  """NF-RegNet. Call with images [N, H, W, 3] (any float dtype; the network
  runs in it) and is_training; returns logits [N, num_classes] float32, plus
  with return_stats=True the dict of nfnets.signal_stats ('squared_mean' and
  'variance' [num_blocks + 1], stem output first; 'residual_variance'
  [num_blocks]), over the local batch, plus with return_features=True the
  feature dict of docs/backbone.md ('stem', 'stage1'..'stage4', 'final',
  'pooled'): (logits, stats, features) with both, leaving out what was not
  asked for, a lone logits unwrapped. with_classifier=False creates no
  'classifier' parameters and leaves logits out.
  """

  def __init__(self, config, name: str | None = None):
    super().__init__(name=name)
    validate_config(config)
    self.config = config
    self.plan = block_plan(config)
    self.activation = activations.get_activation(config.activation,
                                                 config.activation_gamma)
    # Plain (gain 1) nonlinearity inside squeeze-excite, as the reference.
    self.se_activation = activations.get_activation(config.se_activation, 1.0)

  def _conv(self, channels, kernel, stride=1, groups=1, *, name):
    return layers.WSConv2D(channels, kernel, stride,
                           feature_group_count=groups,
                           eps=self.config.ws_eps, name=name)

  def _block(self, x, spec: BlockSpec, is_training):
    """x: [N, H, W, C_in] -> (output, residual-branch output before scaling)."""
    name = f'block{spec.index}'
    config = self.config
    h = layers.nf_branch_input(x, spec.expected_std, self.activation,
                               config.beta_placement)
    shortcut = x
    if spec.is_transition:
      pooled = h
      if spec.stride > 1:
        pooled = hk.avg_pool(h, window_shape=(1, spec.stride, spec.stride, 1),
                             strides=(1, spec.stride, spec.stride, 1),
                             padding='SAME')
      shortcut = self._conv(spec.out_channels, 1, name=f'{name}_shortcut')(
          pooled)
    out = self._conv(spec.expanded_channels, 1, name=f'{name}_conv0')(h)
    out = self._conv(spec.expanded_channels, 3, spec.stride, spec.groups,
                     name=f'{name}_conv1')(self.activation(out))
    if config.use_se:
      out = layers.SqueezeExcite(spec.se_hidden_channels, self.se_activation,
                                 name=f'{name}_se')(out)
    out = self._conv(spec.out_channels, 1, name=f'{name}_conv2')(
        self.activation(out))
    branch = out
    out = layers.stochastic_depth(out, spec.drop_rate, is_training,
                                  config.stochastic_depth_scale_by_keep)
    out = out * layers.scalar_parameter(f'{name}_skip_gain',
                                        config.skip_gain_init, out.dtype)
    return shortcut + out * jnp.asarray(config.alpha, out.dtype), branch

  def __call__(self, images: jax.Array, is_training: bool,
               return_stats: bool = False, return_features: bool = False,
               with_classifier: bool = True):
    if not (with_classifier or return_stats or return_features):
      raise errors.UserError('with_classifier=False leaves nothing to return: '
                             'set return_features or return_stats.')
    layers.check_image_size(total_stride(self.config), images.shape[1],
                            images.shape[2])
    config = self.config
    x = self._conv(stem_channels(config), 3, STEM_STRIDES[config.stem],
                   name='stem_conv')(images)
    recorder = signal_stats.SignalRecorder()
    if return_stats:
      recorder.record_stem(x)
    features = {'stem': x}
    for spec in self.plan:
      x, branch = self._block(x, spec, is_training)
      if return_stats:
        recorder.record_block(x, branch)
      if spec.is_stage_end:
        features[f'stage{spec.stage + 1}'] = x
    x = self.activation(self._conv(head_channels(config), 1,
                                   name='head_conv')(x))
    logits = layers.classifier_head(
        x, config.num_classes, dropout_rate(config), is_training,
        jnp.zeros) if with_classifier else None
    return layers.network_outputs(
        x, logits, recorder.stats() if return_stats else None,
        features if return_features else None)


def build(config) -> hk.TransformedWithState:
  """Validates config and returns the transformed model.

  init(rng, images, is_training) -> (params, state);
  apply(params, state, rng, images, is_training, return_stats=False,
        return_features=False)
    -> (logits, new_state), or ((logits, stats), ...), ((logits, features),
       ...), ((logits, stats, features), ...); features: docs/backbone.md.
  """
  validate_config(config)

  def forward(images, is_training, return_stats=False, return_features=False):
    return NFRegNet(config, name='nf_regnet')(images, is_training,
                                              return_stats, return_features)

  return hk.transform_with_state(forward)


def build_backbone(config) -> hk.TransformedWithState:
  """The network of build(config) without its classifier (same parameter
  names, less 'nf_regnet/classifier'; config.num_classes is unused).

  apply(params, state, rng, images, is_training) -> (features, new_state),
  features as docs/backbone.md; params of build(config) work as they are.
  """
  validate_config(config)
  return layers.backbone_transform(
      lambda: NFRegNet(config, name='nf_regnet'))

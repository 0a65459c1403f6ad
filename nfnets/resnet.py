"""NF-ResNets (paper Sections 3-4): pre-activation bottleneck ResNets without
normalization, and the skeleton their baselines share.

An NF-ResNet block is

    x_{l+1} = x_l + alpha * skip_gain * f_l(x_l / beta_l)

where beta_l is the analytic std of x_l (`block_plan`: the variance is 1
after the stem, grows by alpha^2 per block and resets to 1 + alpha^2 after a
transition block, whose 1x1 shortcut conv sees the rescaled input), f_l is
act -> conv1x1 -> act -> conv3x3 -> act -> conv1x1 with Scaled-WS convs
(nfnets.layers.WSConv2D) and gamma-scaled activations (nfnets.activations),
and skip_gain is a learnable scalar (0 to train, 1 for signal propagation
plots). model.beta_placement='after_activation' feeds the branch
act(x) / beta instead (the authors' NF-RegNet form; the same for ReLU). With use_scaled_ws=False the convs are plain He-init ones (the
paper's "NF, He init" ablation).

The stem (7x7/2 conv and 3x3/2 max-pool; smaller ones for 32 px images,
`STEMS`), the block layout (bottleneck ratio
1/4, stride on the 3x3 conv) and the head (pre-activation, global average
pool, dropout, linear) are shared with the baselines in nfnets.baselines
(config.name 'bn_resnet', 'skipinit_resnet', 'fixup_resnet'), which
`build` builds too.

Three options build timm's nf_resnet26/50/101 exactly (their weights import
with nfnets.timm_weights; defaults are the authors' network): ws_form='timm'
(eps added to Var(W), gamma folded into every Scaled-WS kernel),
padding='symmetric' (PyTorch's padding, max-pool included) and
strided_shortcut='avg_pool_conv' (ResNet-D shortcut).
"""

import dataclasses
import math

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections

from nfnets import activations
from nfnets import baselines
from nfnets import errors
from nfnets import layers
from nfnets import signal_stats
from nfnets import stacking

MODELS = ('nf_resnet',) + baselines.MODELS
BN_ORDERS = baselines.BN_ORDERS
CONV_INITS = baselines.CONV_INITS
BLOCK_LOOPS = stacking.BLOCK_LOOPS
VARIANTS = {
    'ResNet26': (2, 2, 2, 2),
    'ResNet50': (3, 4, 6, 3),
    'ResNet101': (3, 4, 23, 3),
    'ResNet152': (3, 8, 36, 3),
    'ResNet200': (3, 24, 36, 3),
    'ResNet288': (24, 24, 24, 24),
    'ResNet600': (50, 50, 50, 50),
}
STEM_CHANNELS = 64
STAGE_CHANNELS = (256, 512, 1024, 2048)
STAGE_STRIDES = (1, 2, 2, 2)
BOTTLENECK_RATIO = 0.25
STRIDED_SHORTCUTS = ('conv', 'avg_pool_conv')


@dataclasses.dataclass(frozen=True)
class Stem:
  """The conv (and optional 3x3/2 max-pool) in front of the first block."""
  kernel: int
  stride: int
  max_pool: bool


# 'imagenet': the paper's 7x7/2 conv + 3x3/2 max-pool (224 px images).
# 'cifar': 3x3/1 conv, no pool: stage 1 sees the full 32 x 32 image.
# 'cifar_stride2': 3x3/2 conv, no pool: stage 1 at 16 x 16, 4x cheaper.
STEMS = {'imagenet': Stem(7, 2, True), 'cifar': Stem(3, 1, False),
         'cifar_stride2': Stem(3, 2, False)}


def default_config() -> ml_collections.ConfigDict:
  """Every model option with its default; the defaults build NF-ResNet-50."""
  return ml_collections.ConfigDict(dict(
      name='nf_resnet',          # one of MODELS
      variant='ResNet50',        # a key of VARIANTS; or set depths
      depths=(),                 # explicit blocks per stage; overrides variant
      width=1.0,                 # multiplier on 64 / 256-512-1024-2048 channels
      num_classes=1000,
      activation='relu',         # a name in activations.ACTIVATIONS
      # Multiplier on the activation. None: gamma(activation) with Scaled WS,
      # 1 with plain convs (whose init scale, see conv_init, plays gamma's role).
      # With ws_form='timm' it multiplies every Scaled-WS kernel instead.
      activation_gamma=None,
      alpha=0.2,                 # nf_resnet: residual-branch scale
      # nf_resnet: the branch input, act(x / beta) ('before_activation',
      # the paper) or act(x) / beta ('after_activation'); the same for relu.
      beta_placement='before_activation',
      skip_gain_init=0.0,        # nf/skipinit: 0 to train, 1 for SPPs
      use_scaled_ws=True,        # nf_resnet: False = plain He-init convs
      # nf_resnet's Scaled WS, one of layers.WS_FORMS: 'authors' divides by
      # sqrt(max(fan_in * Var(W), ws_eps)) and scales each activation by
      # gamma; 'timm' (timm's nf_resnet*) divides by sqrt(fan_in * (Var(W) +
      # ws_eps)) and multiplies every Scaled-WS kernel, the stem's included,
      # by gamma, its activations unscaled.
      ws_form='authors',
      ws_eps=1e-4,               # see ws_form; timm: 1e-5
      # nf_resnet: conv and max-pool padding, one of layers.PADDINGS: 'same'
      # (TensorFlow's, the authors' code) or 'symmetric' (PyTorch's, timm).
      padding='same',
      # nf_resnet: the shortcut of a strided transition block: 'conv' a
      # strided 1x1 conv (the authors'), 'avg_pool_conv' a 2x2 average pool
      # then a 1x1 conv (ResNet-D, timm).
      strided_shortcut='conv',
      use_se=False,              # squeeze-excite in every block
      se_ratio=0.5,              # SE hidden channels / block output channels
      stochastic_depth_rate=0.0, # rate of the last block; grows linearly
      stochastic_depth_scale_by_keep=True,
      dropout_rate=0.0,          # before the classifier
      stem='imagenet',           # a key of STEMS ('cifar*' for 32 px images)
      bn_order='bn_relu_conv',   # bn_resnet: one of BN_ORDERS
      # Init of the plain (not Scaled-WS) convs inside residual blocks, i.e.
      # every model but Scaled-WS nf_resnet; the stem conv is He in both.
      # 'variance_preserving': N(0, 1 / (fan_in * E[a^2])) where a is the
      #   conv's input at init: a BatchNorm output (relu_bn_conv order,
      #   E[a^2] = 1) or the unscaled activation of a unit Gaussian
      #   (E[relu(z)^2] = 1/2, i.e. He init for ReLU; 1 for identity).
      # 'he': N(0, 2 / fan_in) everywhere, the previous behaviour; He's factor
      #   2 preserves variance only after a ReLU, so it doubles the variance
      #   of every ReLU-BN-Conv branch (residual variance 2, not 1).
      conv_init='variance_preserving',
      bn_decay=0.9,
      bn_eps=1e-5,
      # How the identical (non-transition) blocks of each stage run:
      # 'scan' under one lax.scan per stage, their parameters stored stacked
      # ('resnet/stacked_block2_to_block3/conv0': compile time no longer
      # grows with depth); 'unrolled' one after another, parameters per
      # block ('resnet/block2/conv0'); 'auto' unrolled in training and
      # scanned in SPP measurements of networks deeper than 32 blocks (the
      # rule and why: nfnets/stacking.py). A checkpoint written in either
      # layout loads in the other; only the random init (per-layer key
      # split) and stochastic-depth draws differ.
      block_loop='auto',
      # Mesh axis over which BatchNorm averages batch statistics (data
      # parallel training); None for single-device use.
      bn_axis_name=None,
  ))


def make_config(**overrides) -> ml_collections.ConfigDict:
  config = default_config()
  config.update(overrides)
  return config


def stage_depths(config) -> tuple[int, ...]:
  return tuple(config.depths) if config.depths else VARIANTS[config.variant]


def validate_config(config) -> None:
  """Raises ValueError naming the bad value and what is allowed."""
  if config.name not in MODELS:
    raise ValueError(f'Unknown model {config.name!r}; allowed: {MODELS}.')
  if not config.depths and config.variant not in VARIANTS:
    raise ValueError(f'Unknown variant {config.variant!r}; allowed: '
                     f'{tuple(VARIANTS)} (or set depths).')
  depths = stage_depths(config)
  if len(depths) != 4 or any(int(d) != d or d < 1 for d in depths):
    raise ValueError(f'depths must be 4 positive integers, got {depths}.')
  activations.canonical_name(config.activation)
  if config.activation_gamma is not None and not config.activation_gamma > 0:
    raise ValueError(
        f'activation_gamma must be > 0 (or None), got {config.activation_gamma}.')
  if not config.alpha > 0:
    raise ValueError(f'alpha must be > 0, got {config.alpha}.')
  if not config.width > 0:
    raise ValueError(f'width must be > 0, got {config.width}.')
  if not (isinstance(config.num_classes, int) and config.num_classes >= 1):
    raise ValueError(f'num_classes must be an integer >= 1, got '
                     f'{config.num_classes}.')
  for field in ('stochastic_depth_rate', 'dropout_rate'):
    rate = config[field]
    if not 0 <= rate < 1:
      raise ValueError(f'{field} must be in [0, 1), got {rate}.')
  if config.bn_order not in BN_ORDERS:
    raise ValueError(f'Unknown bn_order {config.bn_order!r}; allowed: '
                     f'{BN_ORDERS}.')
  if not config.se_ratio > 0:
    raise ValueError(f'se_ratio must be > 0, got {config.se_ratio}.')
  if config.conv_init not in CONV_INITS:
    raise ValueError(f'Unknown conv_init {config.conv_init!r}; allowed: '
                     f'{CONV_INITS}.')
  if config.block_loop not in BLOCK_LOOPS:
    raise ValueError(f'Unknown block_loop {config.block_loop!r}; allowed: '
                     f'{BLOCK_LOOPS}.')
  if config.beta_placement not in layers.BETA_PLACEMENTS:
    raise ValueError(f'Unknown beta_placement {config.beta_placement!r}; '
                     f'allowed: {layers.BETA_PLACEMENTS}.')
  if config.stem not in STEMS:
    raise ValueError(f'Unknown stem {config.stem!r}; allowed: '
                     f'{tuple(STEMS)}.')
  for field, allowed, default in (
      ('ws_form', layers.WS_FORMS, 'authors'),
      ('padding', layers.PADDINGS, 'same'),
      ('strided_shortcut', STRIDED_SHORTCUTS, 'conv')):
    if config[field] not in allowed:
      raise ValueError(f'Unknown {field} {config[field]!r}; allowed: '
                       f'{allowed}.')
    if config[field] != default and config.name != 'nf_resnet':
      raise ValueError(f'{field}={config[field]!r} is an nf_resnet option; '
                       f'{config.name} has only {field}={default!r}.')
  if config.ws_form != 'authors' and not config.use_scaled_ws:
    raise ValueError(f'ws_form={config.ws_form!r} needs use_scaled_ws=True.')


def uses_scan(config) -> bool:
  """Whether the network's identical blocks run scanned in training and
  evaluation (nfnets.stacking.scans)."""
  return stacking.scans(config.block_loop, sum(stage_depths(config)))


def other_layouts(config) -> list:
  """[(to_other, back)] between the parameter layout config's block_loop
  stores and the other (scanned or unrolled) one (models.other_layouts)."""
  return stacking.other_layouts(block_plan(config), uses_scan(config))


def total_stride(config) -> int:
  """How much the network downsamples: stem conv, pool, stage strides."""
  stem = STEMS[config.stem]
  return stem.stride * (2 if stem.max_pool else 1) * math.prod(STAGE_STRIDES)



def scaled_channels(channels: int, width: float) -> int:
  return max(1, int(round(channels * width)))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Static layout of one residual block."""
  index: int             # 0-based over the whole network
  stage: int             # 0-based
  in_channels: int
  out_channels: int
  bottleneck_channels: int
  stride: int
  is_transition: bool    # stride > 1 or channel change: 1x1 shortcut conv
  is_stage_end: bool
  expected_std: float    # nf_resnet beta: analytic std of the block input
  drop_rate: float       # stochastic depth rate of this block


def block_plan(config) -> list[BlockSpec]:
  """Every residual block of the network, in order, with its expected std.

  The expected variance is 1 after the stem, grows by alpha^2 per block, and
  is 1 + alpha^2 after a transition block (whose shortcut sees x / beta).
  """
  depths = stage_depths(config)
  num_blocks = sum(depths)
  in_channels = scaled_channels(STEM_CHANNELS, config.width)
  expected_var = 1.0
  plan = []
  for stage, (depth, channels, stride) in enumerate(
      zip(depths, STAGE_CHANNELS, STAGE_STRIDES)):
    out_channels = scaled_channels(channels, config.width)
    for i in range(depth):
      block_stride = stride if i == 0 else 1
      is_transition = block_stride > 1 or in_channels != out_channels
      index = len(plan)
      plan.append(BlockSpec(
          index=index, stage=stage, in_channels=in_channels,
          out_channels=out_channels,
          bottleneck_channels=max(1, int(out_channels * BOTTLENECK_RATIO)),
          stride=block_stride, is_transition=is_transition,
          is_stage_end=(i == depth - 1), expected_std=math.sqrt(expected_var),
          drop_rate=config.stochastic_depth_rate * index / num_blocks))
      expected_var = (1.0 if is_transition else expected_var) + config.alpha**2
      in_channels = out_channels
  return plan


class NFBottleneck(hk.Module):
  """One NF-ResNet block (module name block{index}).

  The static layout comes from a BlockSpec; the two per-block scalars that
  vary along a stage (expected_std, drop_rate) are call arguments, so a scan
  can feed them as per-layer inputs.
  """

  def __init__(self, spec: BlockSpec, parts: 'NFParts', name: str):
    super().__init__(name=name)
    self.spec = spec
    self.parts = parts

  def __call__(self, x, expected_std, drop_rate, is_training: bool):
    """x: [N, H, W, C_in]; expected_std (beta), drop_rate: scalars (Python
    or traced). Returns (output [N, H', W', C_out], branch output before
    stochastic depth and scaling)."""
    spec, config = self.spec, self.parts.config
    conv, act = self.parts.conv, self.parts.activation
    h = layers.nf_branch_input(x, expected_std, act, config.beta_placement)
    shortcut = x
    if spec.is_transition and spec.stride > 1 and (
        config.strided_shortcut == 'avg_pool_conv'):  # ResNet-D
      shortcut = conv(spec.out_channels, 1, name='shortcut')(
          layers.avg_pool_downsample(h, spec.stride))
    elif spec.is_transition:
      shortcut = conv(spec.out_channels, 1, spec.stride, name='shortcut')(h)
    branch = conv(spec.bottleneck_channels, 1, name='conv0')(h)
    branch = conv(spec.bottleneck_channels, 3, spec.stride,
                  name='conv1')(act(branch))
    branch = conv(spec.out_channels, 1, name='conv2')(act(branch))
    if config.use_se:
      hidden = max(1, int(spec.out_channels * config.se_ratio))
      branch = layers.SqueezeExcite(hidden, act, name='se')(branch)
    out = branch
    if config.stochastic_depth_rate > 0:
      out = layers.stochastic_depth(out, drop_rate, is_training,
                                    config.stochastic_depth_scale_by_keep)
    skip_gain = layers.scalar_parameter('skip_gain', config.skip_gain_init,
                                        out.dtype)
    return shortcut + out * skip_gain * jnp.asarray(config.alpha,
                                                   out.dtype), branch


class NFParts:
  """What the ResNet skeleton builds for an NF-ResNet: Scaled-WS convs (or
  plain He-init convs with bias, use_scaled_ws=False), gamma-scaled
  activations, NFBottleneck blocks, an activation before the head and a
  N(0, 0.01^2) classifier. Its methods create Haiku modules in the module
  that calls them."""

  def __init__(self, config, num_blocks: int):
    del num_blocks  # no depth-dependent init
    self.config = config
    gain = config.activation_gamma
    if gain is None and not config.use_scaled_ws:
      gain = 1.0  # plain convs: their init scale plays gamma's role
    self.conv_gamma = 1.0
    if config.ws_form == 'timm':  # gamma moves into every Scaled-WS kernel
      self.conv_gamma = (activations.gamma(config.activation) if gain is None
                         else gain)
      gain = 1.0
    self.activation = activations.get_activation(config.activation, gain)
    self.plain_conv_scale = baselines.block_conv_init_scale(config)
    self.classifier_init = hk.initializers.RandomNormal(0.01)

  def conv(self, channels, kernel, stride=1, *, name, in_block=True):
    padding = layers.window_padding(self.config.padding, kernel, stride)
    if self.config.use_scaled_ws:
      return layers.WSConv2D(channels, kernel, stride, padding,
                             eps=self.config.ws_eps,
                             form=self.config.ws_form, gamma=self.conv_gamma,
                             name=name)
    # He init for the stem, which sees the image.
    return layers.Conv2D(
        channels, kernel, stride, padding, with_bias=True, name=name,
        init_scale=self.plain_conv_scale if in_block else 1.0)

  def block(self, spec: BlockSpec, name: str) -> NFBottleneck:
    return NFBottleneck(spec, self, name=name)

  def head_preactivation(self, x, is_training):
    del is_training
    return self.activation(x)


def _parts(config, num_blocks: int):
  """The NFParts or baselines.Parts of config.name."""
  if config.name in baselines.MODELS:
    return baselines.Parts(config, num_blocks)
  return NFParts(config, num_blocks)


class ResNet(hk.Module):
  """A pre-activation bottleneck ResNet of any kind in MODELS: the NF-ResNet
  (NFParts) or a baseline (baselines.Parts).

  Call with images [N, H, W, 3] (any float dtype; the network runs in it) and
  is_training; returns logits [N, num_classes] in float32, plus with
  return_stats=True the dict of nfnets.signal_stats ('squared_mean' and
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
    self.parts = _parts(config, len(self.plan))

  def __call__(self, images: jax.Array, is_training: bool,
               return_stats: bool = False, return_features: bool = False,
               with_classifier: bool = True):
    if not (with_classifier or return_stats or return_features):
      raise errors.UserError('with_classifier=False leaves nothing to return: '
                             'set return_features or return_stats.')
    layers.check_image_size(total_stride(self.config), images.shape[1],
                            images.shape[2])
    config = self.config
    stem = STEMS[config.stem]
    x = self.parts.conv(scaled_channels(STEM_CHANNELS, config.width),
                        stem.kernel, stem.stride, name='stem_conv',
                        in_block=False)(images)
    if stem.max_pool:
      x = layers.max_pool(x, 3, 2, layers.window_padding(config.padding, 3, 2))
    recorder = signal_stats.SignalRecorder()
    if return_stats:
      recorder.record_stem(x)
    features = {'stem': x}
    stage_outputs = [] if return_features else None
    x = stacking.run_blocks(self.parts.block, self.plan, x, is_training,
                            scanned=uses_scan(config),
                            recorder=recorder if return_stats else None,
                            stage_outputs=stage_outputs)
    x = self.parts.head_preactivation(x, is_training)
    logits = layers.classifier_head(
        x, config.num_classes, config.dropout_rate, is_training,
        self.parts.classifier_init) if with_classifier else None
    if return_features:
      for stage, output in enumerate(stage_outputs):
        features[f'stage{stage + 1}'] = output
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
    return ResNet(config, name='resnet')(images, is_training, return_stats,
                                         return_features)

  return hk.transform_with_state(forward)


def build_backbone(config) -> hk.TransformedWithState:
  """The network of build(config) without its classifier (same parameter
  names, less 'resnet/classifier'; config.num_classes is unused).

  apply(params, state, rng, images, is_training) -> (features, new_state),
  features as docs/backbone.md; params of build(config) work as they are.
  """
  validate_config(config)
  return layers.backbone_transform(lambda: ResNet(config, name='resnet'))

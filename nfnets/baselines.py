"""The paper's baselines: pre-activation bottleneck ResNets with BatchNorm,
SkipInit or Fixup, built by nfnets.resnet's skeleton from these parts.

Models (config.name):
  bn_resnet        BatchNorm ResNetV2; bn_order 'bn_relu_conv' (He et al.
                   2016) or 'relu_bn_conv' (the paper's preferred ordering).
  skipinit_resnet  unnormalized, x + skip_gain * f(x), skip gain init 0.
  fixup_resnet     unnormalized, scalar biases around every activation, a
                   scalar multiplier and bias per branch, last conv of each
                   branch and the classifier zero, the other branch convs
                   scaled by L^(-1/(2m-2)) (m = 3 convs per branch); the
                   transition shortcut convs keep the standard init, as in
                   Fixup (Zhang et al., 2019).

Every conv is a plain (not standardized) conv; inside blocks its init is set
by config.conv_init (`block_conv_init_scale`), the stem's is He.
"""

import math

import haiku as hk
import jax.numpy as jnp

from nfnets import activations
from nfnets import layers

MODELS = ('bn_resnet', 'skipinit_resnet', 'fixup_resnet')
BN_ORDERS = ('bn_relu_conv', 'relu_bn_conv')
CONV_INITS = ('variance_preserving', 'he')
# Fixup: m = 3 convs per residual branch.
_CONVS_PER_BRANCH = 3


def conv_input_second_moment(config) -> float:
  """E[a^2] of what a conv inside a block sees at init, for unit Gaussian
  pre-activations: a BatchNorm output (relu_bn_conv) or the unscaled
  activation g(z), z ~ N(0, 1) (closed form 1/2 for ReLU, else quadrature).
  """
  if config.name == 'bn_resnet' and config.bn_order == 'relu_bn_conv':
    return 1.0
  name = activations.canonical_name(config.activation)
  if name == 'relu':
    return 0.5
  mean, variance = activations.gaussian_moments(activations.ACTIVATIONS[name])
  return mean**2 + variance


def block_conv_init_scale(config) -> float:
  """Multiplier on He init (std sqrt(2 / fan_in)) for plain convs in blocks.

  'variance_preserving' gives std sqrt(1 / (fan_in * E[a^2])) (see
  conv_input_second_moment), which is He's for a ReLU input; 'he' gives 1.
  """
  if config.conv_init == 'he':
    return 1.0
  return math.sqrt(0.5 / conv_input_second_moment(config))


class Parts:
  """What the ResNet skeleton builds for a baseline: plain convs, the
  normalization and nonlinearity in front of every conv (`preactivate`),
  BaselineBottleneck blocks, and the classifier (zero for Fixup). Its
  methods create Haiku modules in the module that calls them."""

  def __init__(self, config, num_blocks: int):
    self.config = config
    self.kind = config.name
    gain = 1.0 if config.activation_gamma is None else config.activation_gamma
    self.activation = activations.get_activation(config.activation, gain)
    self.block_conv_scale = block_conv_init_scale(config)
    self.fixup_scale = num_blocks ** (-1.0 / (2 * _CONVS_PER_BRANCH - 2))
    self.classifier_init = (jnp.zeros if self.kind == 'fixup_resnet'
                            else hk.initializers.RandomNormal(0.01))

  def conv(self, channels, kernel, stride=1, *, name, in_block=True,
           in_branch=True, is_last=False):
    """A plain conv. in_block False: the stem (He init, it sees the image);
    in_branch False: a transition block's shortcut conv, which Fixup leaves
    at the standard init (only residual-branch convs are rescaled)."""
    init_scale = 1.0
    if in_block:
      init_scale = self.block_conv_scale
      if self.kind == 'fixup_resnet' and in_branch:
        init_scale *= 0.0 if is_last else self.fixup_scale
    return layers.Conv2D(channels, kernel, stride, init_scale=init_scale,
                         name=name)

  def preactivate(self, x, is_training, name):
    """Normalization (bn_resnet) and nonlinearity in front of every conv."""
    config = self.config
    if self.kind == 'bn_resnet':
      batch_norm = layers.BatchNorm(config.bn_decay, config.bn_eps,
                                    config.bn_axis_name, name=name)
      if config.bn_order == 'bn_relu_conv':
        return self.activation(batch_norm(x, is_training))
      return batch_norm(self.activation(x), is_training)
    if self.kind == 'fixup_resnet':
      x = x + layers.scalar_parameter(f'{name}_bias_in', 0.0, x.dtype)
      x = self.activation(x)
      return x + layers.scalar_parameter(f'{name}_bias_out', 0.0, x.dtype)
    return self.activation(x)

  def block(self, spec, name: str) -> 'BaselineBottleneck':
    return BaselineBottleneck(spec, self, name=name)

  def head_preactivation(self, x, is_training):
    return self.preactivate(x, is_training, 'head_preact')


class BaselineBottleneck(hk.Module):
  """One pre-activation bottleneck block of a baseline (module name
  block{index}); call arguments as nfnets.resnet.NFBottleneck (expected_std
  unused)."""

  def __init__(self, spec, parts: Parts, name: str):
    super().__init__(name=name)
    self.spec = spec
    self.parts = parts

  def __call__(self, x, expected_std, drop_rate, is_training: bool):
    """x: [N, H, W, C_in] -> (output [N, H', W', C_out], branch output
    before stochastic depth and scaling)."""
    del expected_std  # only NF-ResNets rescale the block input
    spec, parts, config = self.spec, self.parts, self.parts.config
    h = parts.preactivate(x, is_training, 'preact0')
    shortcut = x
    if spec.is_transition:
      shortcut = parts.conv(spec.out_channels, 1, spec.stride,
                            in_branch=False, name='shortcut')(h)
    out = parts.conv(spec.bottleneck_channels, 1, name='conv0')(h)
    out = parts.preactivate(out, is_training, 'preact1')
    out = parts.conv(spec.bottleneck_channels, 3, spec.stride,
                     name='conv1')(out)
    out = parts.preactivate(out, is_training, 'preact2')
    out = parts.conv(spec.out_channels, 1, name='conv2', is_last=True)(out)
    if config.use_se:
      hidden = max(1, int(spec.out_channels * config.se_ratio))
      out = layers.SqueezeExcite(hidden, parts.activation, name='se')(out)
    branch = out
    if config.stochastic_depth_rate > 0:
      out = layers.stochastic_depth(out, drop_rate, is_training,
                                    config.stochastic_depth_scale_by_keep)
    if parts.kind == 'skipinit_resnet':
      out = out * layers.scalar_parameter('skip_gain', config.skip_gain_init,
                                          out.dtype)
    if parts.kind == 'fixup_resnet':
      out = out * layers.scalar_parameter('multiplier', 1.0, out.dtype)
      out = out + layers.scalar_parameter('bias', 0.0, out.dtype)
    return shortcut + out, branch

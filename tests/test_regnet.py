"""NF-RegNets: every variant, sizes, counts, signal propagation, configs."""

import functools
import importlib

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import regnet_base
from nfnets import counting
from nfnets import layers
from nfnets import models
from nfnets import optim
from nfnets import regnet
from nfnets import spp
from conftest import jitted


def _closed_form_param_count(widths, depths, width=0.75, num_classes=1000,
                             expansion=2.25, group_width=8, se_ratio=0.5,
                             use_se=True):
  """Parameters of an NF-RegNet, written from the architecture description
  (not from the model code): every conv has a weight, a gain and a bias."""
  def conv(fan_in_per_group, out, kernel):
    return kernel * kernel * fan_in_per_group * out + 2 * out

  channels = [int(w * width) for w in widths]
  previous = channels[0]
  total = conv(3, previous, 3)  # 3x3 stem on RGB
  first = True
  for out, depth in zip(channels, depths):
    for i in range(depth):
      ratio = 1.0 if first else expansion
      mid = max(group_width, int(previous * ratio) // group_width * group_width)
      total += conv(previous, mid, 1)            # expansion
      total += conv(group_width, mid, 3)         # grouped 3x3
      if use_se:
        hidden = int(mid * se_ratio)
        total += 2 * mid * hidden + hidden + mid  # two linears with bias
      total += conv(mid, out, 1)                 # projection
      if i == 0 or previous != out:              # every stage starts strided
        total += conv(previous, out, 1)          # shortcut
      total += 1                                 # skip gain
      previous, first = out, False
  head = 1280 * previous // 440
  return total + conv(previous, head, 1) + head * num_classes + num_classes


@pytest.mark.parametrize('variant', list(regnet.VARIANTS))
def test_every_variant_builds_with_closed_form_param_count(variant):
  shape = regnet.VARIANTS[variant]
  config = regnet.make_config(variant=variant)
  # jax.eval_shape: traces B8 at its 600 px without computing anything.
  params, macs = counting.count_params_and_macs(config, shape.train_image_size)
  assert params == _closed_form_param_count(shape.widths, shape.depths)
  assert macs > 0


def test_b0_size_and_macs():
  params, macs = counting.count_params_and_macs(regnet.default_config(), 224)
  assert params == 8_595_372
  # The paper's Figure 3 puts NF-RegNet-B0 at about 0.44-0.45 G(multiply-add)
  # FLOPs at its 224 px test resolution.
  assert macs == pytest.approx(0.445e9, rel=0.02)


def test_block_plan_follows_reference_layout():
  plan = regnet.block_plan(regnet.default_config())
  assert [s.stage for s in plan] == [0] + [1] * 3 + [2] * 6 + [3] * 6
  # 0.75 x 48/104/208/440, truncated; expansion 1 in block 0, then 2.25 x
  # input channels rounded down to whole groups of 8.
  assert [s.out_channels for s in plan[:5]] == [36, 78, 78, 78, 156]
  assert [s.expanded_channels for s in plan[:6]] == [32, 80, 168, 168, 168, 344]
  assert [s.groups for s in plan[:3]] == [4, 10, 21]
  assert [s.stride for s in plan] == [2, 2, 1, 1, 2] + [1] * 5 + [2] + [1] * 5
  assert [s.is_transition for s in plan] == [s.stride == 2 for s in plan]
  # Variance 1 after the stem, + alpha^2 per block, 1 + alpha^2 after each
  # stage's first block.
  var = [s.expected_std**2 for s in plan]
  np.testing.assert_allclose(var[:6], [1, 1.04, 1.04, 1.08, 1.12, 1.04])
  np.testing.assert_allclose([s.drop_rate for s in plan],
                             0.1 * np.arange(16) / 16)
  assert regnet.head_channels(regnet.default_config()) == 960


def _tiny_config(**overrides):
  return regnet.make_config(**{**dict(
      widths=(16, 24, 32, 48), depths=(1, 2, 1, 1), width=1.0,
      num_classes=7), **overrides})


def test_tiny_regnet_runs_in_bf16_and_is_identity_at_init():
  config = _tiny_config(dropout_rate=0.3, stochastic_depth_rate=0.5)
  model = models.build(config)
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3), jnp.bfloat16)
  init, apply = jitted(model)
  params, state = init(jax.random.key(1), images, True)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  logits, _ = apply(params, state, jax.random.key(2), images, True)
  assert logits.shape == (4, 7) and logits.dtype == jnp.float32
  # Zero-initialized classifier: every logit is exactly 0 at init.
  assert np.all(np.asarray(logits) == 0)
  (_, stats), _ = apply(params, state, None, images, False, True)
  assert stats['variance'].shape == (6,)
  assert stats['residual_variance'].shape == (5,)
  assert np.all(np.asarray(stats['residual_variance']) > 0)
  # Skip gains start at 0: block 2 (not a transition) passes its input on
  # (the same tensor; its two reductions may round differently by an ulp).
  np.testing.assert_allclose(stats['variance'][3], stats['variance'][2],
                             rtol=1e-6)


def test_macs_agree_with_xla_cost_analysis():
  config = _tiny_config()
  model = regnet.build(config)
  images = jnp.zeros((1, 64, 64, 3))
  params, state = jitted(model)[0](jax.random.key(0), images, True)
  forward = jax.jit(lambda p, s, x: model.apply(p, s, None, x, False)[0])
  cost = forward.lower(params, state, images).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  _, macs = counting.count_params_and_macs(config, 64)
  # XLA adds elementwise work (activations, WS, SE, pooling) to 2 flops/MAC.
  assert cost['flops'] / (2 * macs) == pytest.approx(1.0, abs=0.15)


def _subsample(x, window_shape, strides, padding):
  """A strided subsample with avg_pool's signature (test-only replacement)."""
  del window_shape, padding
  return x[:, ::strides[1], ::strides[2], :]


@functools.cache
def _signal_stats(activation, use_se, pool_shortcut):
  """SPP statistics at init (alpha 1, skip gain 1) on N(0, 1) images, of
  the reference block (act(x) / beta)."""
  config = regnet.make_config(
      widths=(48, 104, 208, 440), depths=(1, 3, 3, 2), width=0.5, alpha=1.0,
      skip_gain_init=1.0, activation=activation, use_se=use_se,
      beta_placement='after_activation',
      stochastic_depth_rate=0.0, dropout_rate=0.0, num_classes=10)
  model = regnet.build(config)
  images = jax.random.normal(jax.random.key(0), (8, 128, 128, 3))

  def statistics(x):
    params, state = model.init(jax.random.key(1), x, True)
    return model.apply(params, state, None, x, True, True)[0][1]

  pool = hk.avg_pool
  hk.avg_pool = pool if pool_shortcut else _subsample
  try:
    stats = jax.jit(statistics)(images)
  finally:
    hk.avg_pool = pool
  return regnet.block_plan(config), jax.tree.map(np.asarray, stats)


@pytest.mark.parametrize('activation,use_se', [('silu', True),
                                               ('relu', False)])
def test_variance_follows_bookkeeping_without_pooling_loss(activation, use_se):
  """With the shortcut's 2x2 average pool replaced by a strided subsample
  (which keeps the variance of spatially white signals, unlike the pool),
  the block outputs follow the analytic expected variance and every residual
  branch has variance about 1."""
  plan, stats = _signal_stats(activation, use_se, pool_shortcut=False)
  stage = np.array([s.stage for s in plan])
  ratio = stats['variance'][1:] / spp.expected_variances(plan, 1.0)[1:]
  # Stages 1-3 run at >= 8x8 px; stage 4 at 4x4 px, where the 3x3 convs
  # mostly see zero padding, loses more.
  early = stage < 3
  assert np.all((ratio[early] > 0.75) & (ratio[early] < 1.25)), ratio
  assert np.all(ratio[~early] > 0.5), ratio
  residual = stats['residual_variance']
  assert np.all((residual[early] > 0.75) & (residual[early] < 1.25)), residual
  # Scaled WS: no mean shift.
  assert np.all(stats['squared_mean'][1:] < 0.05 * stats['variance'][1:])


def test_average_pool_shortcut_loses_variance_on_white_noise():
  """The reference model itself (avg-pool shortcut) on the SPP's white-noise
  input: the pool quarters the shortcut's variance at every stride-2 block,
  so the measured variance falls below the bookkeeping there; the branches
  stay variance preserving relative to their actual input (ReLU, which is
  homogeneous, so a smaller input variance scales the branch exactly)."""
  plan, stats = _signal_stats('relu', False, pool_shortcut=True)
  _, no_pool = _signal_stats('relu', False, pool_shortcut=False)
  variance, residual = stats['variance'], stats['residual_variance']
  expected = spp.expected_variances(plan, 1.0)
  for spec in plan:
    i = spec.index
    # beta = 1 / expected std: the branch output variance is the block
    # input's measured variance over its expected one (stages 1-3).
    if spec.stage < 3:
      assert 0.75 < residual[i] / (variance[i] / expected[i]) < 1.3, spec
    if spec.is_transition:
      assert variance[i + 1] < 0.8 * no_pool['variance'][i + 1], spec
      # The shortcut (output minus branch) keeps well under half of the
      # variance its input would have kept.
      shortcut = variance[i + 1] - residual[i]
      assert shortcut < 0.5 * variance[i] / expected[i], spec
    else:
      # Identity shortcut: the variance grows by the branch's variance.
      assert variance[i + 1] - variance[i] == pytest.approx(residual[i],
                                                            rel=0.2)


@pytest.mark.parametrize('overrides,message', [
    (dict(name='nf_regnet_b0'), "Unknown model 'nf_regnet_b0'"),
    (dict(variant='B9'), "Unknown variant 'B9'"),
    (dict(activation='swoosh'), "Unknown activation 'swoosh'"),
    (dict(alpha=0.0), 'alpha must be > 0, got 0.0'),
    (dict(expansion=-1.0), 'expansion must be > 0'),
    (dict(group_width=0), 'group_width must be an integer >= 1, got 0'),
    (dict(width=0.01), 'width=0.01 leaves the stem with no channels'),
    (dict(dropout_rate=1.0), r'dropout_rate must be in \[0, 1\)'),
    (dict(stochastic_depth_rate=-0.1),
     r'stochastic_depth_rate must be in \[0, 1\)'),
    (dict(depths=(1, 2, 3)), 'depths must be 4 positive integers'),
    (dict(widths=(8, 16, 0, 32)), 'widths must be 4 positive integers'),
])
def test_bad_config_raises_clear_error(overrides, message):
  with pytest.raises(ValueError, match=message):
    models.build(regnet.make_config(**overrides))


def test_image_too_small_raises_before_compute():
  with pytest.raises(ValueError, match='16 px is too small.*at least 32'):
    counting.count_params_and_macs(regnet.default_config(), 16)
  model = regnet.build(_tiny_config())
  with pytest.raises(ValueError, match='24 px is too small'):
    model.init(jax.random.key(0), jnp.zeros((1, 24, 64, 3)), is_training=True)


@pytest.mark.parametrize('variant', list(regnet.VARIANTS))
def test_imagenet_configs_carry_the_reference_recipe(variant):
  config = importlib.import_module(
      f'configs.nf_regnet_{variant.lower()}').get_config()
  shape = regnet.VARIANTS[variant]
  models.validate_config(config.model)
  assert config.model.name == 'nf_regnet' and config.model.variant == variant
  assert config.model.dropout_rate == shape.dropout_rate
  assert (config.data.image_size, config.data.eval_image_size) == (
      shape.train_image_size, shape.test_image_size)
  assert (config.train.mixup_alpha, config.train.cutmix) == (0.2, True)
  assert (config.train.batch_size, config.train.epochs) == (1024, 360)
  assert config.optim.ema_decay == 0.99999
  assert config.optim.label_smoothing == 0.1
  schedule = optim.learning_rate_schedule(config.optim, 1024, 1000, 10)
  assert float(schedule(50)) == pytest.approx(0.4)      # peak after warmup
  assert float(schedule(1000)) == pytest.approx(0.001)  # cosine floor


def test_cifar_stem_and_beta_placement():
  """stem='cifar' keeps 32 x 32 into stage 1 (total stride 16); the model
  default feeds branches act(x / beta) as NF-ResNets do, and the ImageNet
  recipe keeps the authors' act(x) / beta, which differs for silu."""
  tiny = dict(width=1.0, widths=(8, 16, 16, 32), depths=(1, 1, 1, 1),
              num_classes=10, skip_gain_init=1.0, stochastic_depth_rate=0.0,
              dropout_rate=0.0)
  config = regnet.make_config(stem='cifar', **tiny)
  assert regnet.total_stride(config) == 16
  assert regnet.default_config().beta_placement == 'before_activation'
  assert regnet_base.nf_regnet_imagenet('B0').model.beta_placement == (
      'after_activation')
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  outputs = {}
  for placement in layers.BETA_PLACEMENTS:
    model = regnet.build(regnet.make_config(stem='cifar',
                                            beta_placement=placement, **tiny))
    params, state = model.init(jax.random.key(1), images, True)
    (_, stats), _ = model.apply(params, state, None, images, True, True)
    outputs[placement] = stats['variance']  # the classifier starts at 0
    assert params['nf_regnet/~_conv/stem_conv']['w'].shape == (3, 3, 3, 8)
  assert not np.allclose(*outputs.values(), rtol=1e-3)
  with pytest.raises(ValueError, match="Unknown stem 'cifar_stride2'"):
    regnet.validate_config(regnet.make_config(stem='cifar_stride2'))

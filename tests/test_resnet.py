"""NF-ResNets (nfnets.resnet) and the skeleton every ResNet model shares:
signal propagation at init, the block plan, parameter and MAC counts of
every model and variant, building and running every model, bad configs and
images. (Baseline-specific tests: test_baselines.py; scanned blocks:
test_stacking.py.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import counting
from nfnets import models
from nfnets import resnet
from nfnets import spp
from conftest import jitted


@functools.cache
def _deep_signal_stats(use_scaled_ws: bool):
  """SPP statistics of a 52-block NF-ResNet at init (alpha 1, skip gain 1)."""
  config = resnet.make_config(
      depths=(13, 13, 13, 13), width=1 / 16, alpha=1.0, skip_gain_init=1.0,
      use_scaled_ws=use_scaled_ws, num_classes=10)
  model = resnet.build(config)
  images = jax.random.normal(jax.random.key(0), (8, 128, 128, 3))
  init, apply = jitted(model)
  params, state = init(jax.random.key(1), images, True)
  (_, stats), _ = apply(params, state, None, images, True, True)
  return resnet.block_plan(config), jax.tree.map(np.asarray, stats)


def test_scaled_ws_tracks_analytic_variance_without_mean_shift():
  plan, stats = _deep_signal_stats(use_scaled_ws=True)
  stage = np.array([spec.stage for spec in plan])
  variance = stats['variance'][1:]
  ratio = variance / spp.expected_variances(plan, alpha=1.0)[1:]
  # Stages 1-3 run at >= 8x8 px: the measured variance follows the analytic
  # one (which reaches 14 at the end of a stage) within 30%.
  early = stage < 3
  assert np.all((ratio[early] > 0.7) & (ratio[early] < 1.3)), ratio
  # Stage 4 runs at 4x4 px where the 3x3 convs see mostly zero padding,
  # which removes variance; it still grows linearly, just with a smaller slope.
  assert np.all(ratio[~early] > 0.5) and np.all(np.diff(variance[~early]) > 0)
  # No mean shift: the channel means stay small next to the variance.
  assert np.all(stats['squared_mean'][1:] < 0.05 * variance)
  # Each residual branch is variance preserving: about 1.
  for s in range(3):
    assert 0.85 < stats['residual_variance'][stage == s].mean() < 1.3


def test_he_init_convs_show_growing_mean_shift():
  plan, stats = _deep_signal_stats(use_scaled_ws=False)
  stage = np.array([spec.stage for spec in plan])
  squared_mean = stats['squared_mean'][1:]
  variance = stats['variance'][1:]
  for s in range(4):
    in_stage = squared_mean[stage == s]
    assert in_stage[-1] > 2 * in_stage[0], (s, in_stage)
  # Mean shift dominates: the squared mean exceeds the channel variance.
  assert np.mean(squared_mean > variance) > 0.9
  _, ws_stats = _deep_signal_stats(use_scaled_ws=True)
  ws_ratio = ws_stats['squared_mean'][1:] / ws_stats['variance'][1:]
  assert np.all(squared_mean / variance > 10 * ws_ratio)


def test_activation_fed_plain_convs_preserve_variance():
  """conv_init='variance_preserving' scales plain convs by 1 / E[g(z)^2]: an
  identity-fed branch keeps unit variance, He's factor 2 makes it 2^3."""
  first_branch = {}
  for conv_init in resnet.CONV_INITS:
    config = resnet.make_config(
        depths=(2, 1, 1, 1), width=1 / 4, alpha=1.0, skip_gain_init=1.0,
        use_scaled_ws=False, activation='identity', conv_init=conv_init,
        num_classes=10)
    images = jax.random.normal(jax.random.key(0), (8, 64, 64, 3))
    init, apply = jitted(resnet.build(config))
    params, state = init(jax.random.key(1), images, True)
    (_, stats), _ = apply(params, state, None, images, True, True)
    # The first branch sees the stem output / 1 (the stem stays He).
    first_branch[conv_init] = stats['residual_variance'][0] / stats[
        'variance'][0]
  # About 1; above it by the stem's max-pooled channel means, which zero
  # padding turns into position-dependent means at the 16 x 16 borders.
  assert 0.75 < first_branch['variance_preserving'] < 1.7
  # Same draws, every block conv sqrt(2) larger: three linear convs, 2^3.
  assert first_branch['he'] / first_branch['variance_preserving'] == (
      pytest.approx(8.0, rel=1e-3))


def test_block_plan_expected_std_resets_after_transitions():
  config = resnet.make_config(depths=(2, 3, 1, 1), alpha=0.5)
  stds = [spec.expected_std**2 for spec in resnet.block_plan(config)]
  np.testing.assert_allclose(stds, [1, 1.25, 1.5, 1.25, 1.5, 1.75, 1.25])
  config = resnet.make_config(stochastic_depth_rate=0.2, depths=(1, 1, 1, 1))
  np.testing.assert_allclose(
      [spec.drop_rate for spec in resnet.block_plan(config)],
      [0, 0.05, 0.1, 0.15])


def _conv_params(kind, use_scaled_ws, in_ch, out_ch, kernel):
  weights = kernel * kernel * in_ch * out_ch
  if kind == 'nf_resnet':
    return weights + (2 * out_ch if use_scaled_ws else out_ch)
  return weights


def _analytic_param_count(name, depths, width, num_classes, use_se,
                          use_scaled_ws=True, se_ratio=0.5):
  """Closed-form parameter count, written independently of the model code."""
  channel = lambda c: max(1, int(round(c * width)))
  conv = functools.partial(_conv_params, name, use_scaled_ws)
  # Parameters of one pre-activation (BN scale and offset; Fixup's 2 biases).
  preact = {'bn_resnet': lambda c: 2 * c, 'fixup_resnet': lambda c: 2}.get(
      name, lambda c: 0)
  in_ch = channel(64)
  total = conv(3, in_ch, 7)
  for stage, depth in enumerate(depths):
    out_ch = channel([256, 512, 1024, 2048][stage])
    mid = max(1, int(out_ch / 4))
    for i in range(depth):
      total += preact(in_ch) + 2 * preact(mid)
      total += conv(in_ch, mid, 1) + conv(mid, mid, 3) + conv(mid, out_ch, 1)
      if in_ch != out_ch or (i == 0 and stage > 0):
        total += conv(in_ch, out_ch, 1)
      if use_se:
        hidden = max(1, int(out_ch * se_ratio))
        total += out_ch * hidden + hidden + hidden * out_ch + out_ch
      total += {'nf_resnet': 1, 'skipinit_resnet': 1, 'fixup_resnet': 2}.get(
          name, 0)
      in_ch = out_ch
  return total + preact(in_ch) + in_ch * num_classes + num_classes


@pytest.mark.parametrize('name', resnet.MODELS)
@pytest.mark.parametrize('variant', list(resnet.VARIANTS))
def test_every_variant_builds_with_analytic_param_count(name, variant):
  use_se = variant == 'ResNet26'
  config = resnet.make_config(name=name, variant=variant, use_se=use_se)
  params, _ = counting.count_params_and_macs(config, 224)
  depths = resnet.VARIANTS[variant]
  assert params == _analytic_param_count(name, depths, 1.0, 1000, use_se)


def test_nf_resnet50_matches_published_size():
  params, macs = counting.count_params_and_macs(resnet.make_config(), 224)
  assert params == pytest.approx(25.56e6, rel=1e-3)  # timm's nf_resnet50
  assert macs == pytest.approx(4.1e9, rel=0.02)
  he_params, _ = counting.count_params_and_macs(
      resnet.make_config(use_scaled_ws=False, width=0.5), 64)
  assert he_params == _analytic_param_count(
      'nf_resnet', (3, 4, 6, 3), 0.5, 1000, False, use_scaled_ws=False)


@pytest.mark.parametrize('name', resnet.MODELS)
def test_macs_agree_with_xla_cost_analysis(name):
  config = resnet.make_config(name=name, width=0.125, depths=(1, 2, 1, 1),
                              num_classes=10, use_se=True)
  model = resnet.build(config)
  images = jnp.zeros((1, 128, 128, 3))
  params, state = jitted(model)[0](jax.random.key(0), images, True)
  forward = jax.jit(lambda p, s, x: model.apply(p, s, None, x, False)[0])
  cost = forward.lower(params, state, images).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  _, macs = counting.count_params_and_macs(config, 128)
  # XLA adds the elementwise work (activations, WS, BN) to 2 flops per MAC.
  assert cost['flops'] / (2 * macs) == pytest.approx(1.0, abs=0.08)


@pytest.mark.parametrize('name', resnet.MODELS)
def test_defaults_build_and_train_mode_runs(name):
  config = resnet.make_config(name=name, width=1 / 32, depths=(1, 1, 1, 1),
                              num_classes=7, dropout_rate=0.3,
                              stochastic_depth_rate=0.5, use_se=True)
  model = resnet.build(config)
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3), jnp.bfloat16)
  init, apply = jitted(model)
  params, state = init(jax.random.key(1), images, True)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  logits, _ = apply(params, state, jax.random.key(2), images, True)
  assert logits.shape == (4, 7) and np.all(np.isfinite(logits))


def test_default_config_builds_nf_resnet50():
  model = resnet.build(resnet.default_config())
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  params, state = jax.eval_shape(
      functools.partial(model.init, is_training=True), jax.random.key(0),
      images)
  assert counting.count_params(params) == pytest.approx(25.56e6, rel=1e-3)


def test_skip_gain_zero_makes_blocks_identity_at_init():
  config = resnet.make_config(width=1 / 16, depths=(2, 2, 1, 1), num_classes=3)
  model = resnet.build(config)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  init, apply = jitted(model)
  params, state = init(jax.random.key(1), images, True)
  (_, stats), _ = apply(params, state, None, images, False, True)
  # Non-transition blocks add nothing: the signal is unchanged by them.
  assert stats['variance'][2] == stats['variance'][1]
  assert stats['variance'][4] == stats['variance'][3]


@pytest.mark.parametrize('overrides,message', [
    (dict(name='vgg'), "Unknown model 'vgg'"),
    (dict(variant='ResNet51'), "Unknown variant 'ResNet51'"),
    (dict(activation='swoosh'), "Unknown activation 'swoosh'"),
    (dict(alpha=0.0), 'alpha must be > 0, got 0.0'),
    (dict(alpha=-0.2), 'alpha must be > 0, got -0.2'),
    (dict(width=0.0), 'width must be > 0'),
    (dict(stochastic_depth_rate=1.0), r'stochastic_depth_rate must be in \[0, 1\)'),
    (dict(dropout_rate=-0.1), r'dropout_rate must be in \[0, 1\)'),
    (dict(bn_order='conv_bn_relu'), "Unknown bn_order 'conv_bn_relu'"),
    (dict(conv_init='xavier'), "Unknown conv_init 'xavier'; allowed: "
                               r"\('variance_preserving', 'he'\)"),
    (dict(depths=(3, 4, 6)), 'depths must be 4 positive integers'),
])
def test_bad_config_raises_clear_error(overrides, message):
  with pytest.raises(ValueError, match=message):
    resnet.build(resnet.make_config(**overrides))


def test_image_too_small_raises_before_compute():
  with pytest.raises(ValueError, match='16 px is too small.*at least 32'):
    counting.count_params_and_macs(resnet.make_config(), 16)
  model = resnet.build(resnet.make_config(width=1 / 16))
  with pytest.raises(ValueError, match='24 px is too small'):
    model.init(jax.random.key(0), jnp.zeros((1, 24, 64, 3)), is_training=True)


@pytest.mark.parametrize('stem,stride', [('imagenet', 32), ('cifar', 8),
                                         ('cifar_stride2', 16)])
@pytest.mark.parametrize('name', resnet.MODELS)
def test_every_model_takes_every_stem(name, stem, stride):
  config = resnet.make_config(name=name, stem=stem, depths=(1, 1, 1, 1),
                              width=1 / 16, num_classes=10)
  assert resnet.total_stride(config) == stride
  model = resnet.build(config)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  params, state = jax.jit(model.init, static_argnums=2)(
      jax.random.key(1), images, True)
  kernel = {'imagenet': 7}.get(stem, 3)
  assert params['resnet/stem_conv']['w'].shape[:2] == (kernel, kernel)
  logits, _ = model.apply(params, state, None, images, False)
  assert logits.shape == (2, 10)
  with pytest.raises(ValueError, match=f'at least {stride} px'):
    models.check_image_size(config, stride // 2)


def test_cifar_stem_keeps_the_analytic_variance_at_32_px():
  """With the stride-1 stem the stages run at 32, 16, 8 and 4 px: the
  measured variance follows the expected one as with the ImageNet stem at
  4x the image size, and the stem output is the unit-variance start."""
  config = resnet.make_config(stem='cifar', depths=(4, 4, 4, 4), width=1 / 4,
                              alpha=1.0, skip_gain_init=1.0, num_classes=10)
  images = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  init, apply = jitted(resnet.build(config))
  params, state = init(jax.random.key(1), images, True)
  (_, stats), _ = apply(params, state, None, images, True, True)
  plan = resnet.block_plan(config)
  ratio = np.asarray(stats['variance']) / spp.expected_variances(plan, 1.0)
  stage = np.array([-1] + [spec.stage for spec in plan])
  assert np.all((ratio[stage < 3] > 0.7) & (ratio[stage < 3] < 1.3)), ratio
  assert np.all(np.asarray(stats['squared_mean'])[1:]
                < 0.05 * np.asarray(stats['variance'])[1:])


@pytest.mark.parametrize('activation,same', [('relu', True), ('silu', False)])
def test_beta_placement_matters_only_for_non_homogeneous_activations(
    activation, same):
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3)) * 3
  outputs = []
  for placement in ('before_activation', 'after_activation'):
    config = resnet.make_config(
        depths=(2, 1, 1, 1), width=1 / 16, num_classes=10, alpha=1.0,
        skip_gain_init=1.0, activation=activation, beta_placement=placement)
    model = resnet.build(config)
    params, state = model.init(jax.random.key(1), images, True)
    outputs.append(model.apply(params, state, None, images, False)[0])
  close = np.allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
  assert close == same
  with pytest.raises(ValueError, match="beta_placement 'inside'.*allowed"):
    resnet.validate_config(resnet.make_config(beta_placement='inside'))

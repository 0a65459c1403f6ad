"""The paper's baselines (nfnets.baselines): a BatchNorm ResNet's signal
propagation at init for both BN orders and both conv inits, and the He init
of ReLU-fed convs. (What every ResNet model shares: test_resnet.py.)"""

import functools

import jax
import numpy as np
import pytest

from nfnets import resnet
from conftest import jitted


@functools.cache
def _bn_signal_stats(bn_order: str, conv_init: str):
  """SPP statistics of a 12-block BN ResNet at init (width 1/8, 32 px)."""
  config = resnet.make_config(name='bn_resnet', depths=(3, 3, 3, 3),
                              width=1 / 8, bn_order=bn_order,
                              conv_init=conv_init, num_classes=10)
  images = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
  init, apply = jitted(resnet.build(config))
  params, state = init(jax.random.key(1), images, True)
  (_, stats), _ = apply(params, state, None, images, True, True)
  return params, jax.tree.map(np.asarray, stats)


@pytest.mark.parametrize('bn_order,conv_init,branch_variance', [
    # Convs fed by BatchNorm get fan-in scale 1: branches preserve BN's 1.
    ('relu_bn_conv', 'variance_preserving', 1.0),
    # He's factor 2 after BatchNorm doubles it (the old behaviour).
    ('relu_bn_conv', 'he', 2.0),
    # Convs fed by a ReLU keep He's factor 2: second moment 1, of which the
    # squared channel mean takes 1/pi, the variance 1 - 1/pi.
    ('bn_relu_conv', 'variance_preserving', 1 - 1 / np.pi),
])
def test_bn_resnet_branch_and_stage_end_variance(bn_order, conv_init,
                                                 branch_variance):
  _, stats = _bn_signal_stats(bn_order, conv_init)
  stage = np.repeat(np.arange(4), 3)
  for s in range(4):
    np.testing.assert_allclose(
        stats['residual_variance'][stage == s].mean(), branch_variance,
        rtol=0.12)
  # A transition's shortcut conv sees the pre-activated input, so its output
  # has the branch variance too; each block adds one: a 3-block stage ends
  # at 4 x the branch variance.
  stage_ends = stats['variance'][[3, 6, 9, 12]]
  np.testing.assert_allclose(stage_ends, 4 * branch_variance, rtol=0.15)
  mean_shift = stats['squared_mean'][1:] > 0.05 * stats['variance'][1:]
  assert np.all(mean_shift) == (bn_order == 'bn_relu_conv')


def test_relu_fed_convs_are_he_initialized_in_both_modes():
  he_params, _ = _bn_signal_stats('bn_relu_conv', 'he')
  params, _ = _bn_signal_stats('bn_relu_conv', 'variance_preserving')
  jax.tree.map(np.testing.assert_array_equal, params, he_params)
  conv = 'resnet/block1/conv0'  # 1x1, fan-in 32
  assert np.std(params[conv]['w']) == pytest.approx(np.sqrt(2 / 32), rel=0.1)
  bn_fed_params, _ = _bn_signal_stats('relu_bn_conv', 'variance_preserving')
  assert np.std(bn_fed_params[conv]['w']) == pytest.approx(np.sqrt(1 / 32),
                                                           rel=0.1)


def test_fixup_rescales_branch_convs_but_not_shortcuts():
  """Fixup (Zhang et al. 2019): only the convs inside residual branches are
  scaled by L^(-1/(2m-2)) (m = 3), the last one of each branch and the
  classifier start at zero; a transition's shortcut conv keeps the
  standard (He, ReLU-fed) init."""
  config = resnet.make_config(name='fixup_resnet', depths=(2, 2, 2, 2),
                              width=1 / 4, num_classes=10)
  images = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
  params, _ = resnet.build(config).init(jax.random.key(1), images, True)
  fixup_scale = 8 ** (-1 / 4)
  for block in ('block2', 'block4', 'block6'):  # transitions
    for conv, scale in (('shortcut', 1.0), ('conv0', fixup_scale),
                        ('conv1', fixup_scale)):
      weight = np.asarray(params[f'resnet/{block}/{conv}']['w'])
      he_std = np.sqrt(2 / np.prod(weight.shape[:3]))
      assert np.std(weight) == pytest.approx(scale * he_std, rel=0.1), (
          block, conv)
    assert not np.any(params[f'resnet/{block}/conv2']['w'])
  assert not np.any(params['resnet/classifier']['w'])

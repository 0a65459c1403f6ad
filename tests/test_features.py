"""The models as backbones (return_features, build_backbone; docs/backbone.md):
shapes and channels per stage, stage outputs that are the stage-end blocks'
outputs, 'pooled' and the logits against the head's own formulas, scanned
== unrolled, the headless build, and the docs examples run as written.
Parameters are random stand-ins (_random_values), not compiled inits."""

import functools
import pathlib
import re

import haiku as hk
import jax
import numpy as np
import pytest

from nfnets import errors
from nfnets import models
from nfnets import regnet
from nfnets import resnet
from nfnets import signal_stats

ROOT = pathlib.Path(__file__).resolve().parent.parent
KEYS = ('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'final', 'pooled')

# name: (config, image px, stem stride, stage strides, stem channels, stage
# channels, 'final' channels), the strides and channels written out from
# docs/backbone.md's tables rather than computed by the code under test.
CASES = {
    # Blocks 2-3 (the end of stage 2) are the ones a scan runs.
    'nf_imagenet': (resnet.make_config(depths=(1, 3, 1, 1), width=1 / 16,
                                       num_classes=10),
                    64, 4, (4, 8, 16, 32), 4, (16, 32, 64, 128), 128),
    'nf_cifar': (resnet.make_config(depths=(1, 1, 1, 1), width=1 / 16,
                                    num_classes=10, stem='cifar'),
                 32, 1, (1, 2, 4, 8), 4, (16, 32, 64, 128), 128),
    'bn_imagenet': (resnet.make_config(name='bn_resnet', depths=(1, 1, 1, 1),
                                       width=1 / 16, num_classes=10),
                    64, 4, (4, 8, 16, 32), 4, (16, 32, 64, 128), 128),
    # Stochastic depth 0.1 and dropout 0.2: the variant's defaults.
    'regnet': (regnet.make_config(widths=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                                  width=1.0, num_classes=10),
               64, 2, (4, 8, 16, 32), 8, (8, 16, 24, 32), 1280 * 32 // 440),
}


def _images(size, batch=2):
  return jax.random.normal(jax.random.key(0), (batch, size, size, 3))


def _random_values(shapes, seed: int):
  """Stand-ins for trained parameters or state, shaped as `shapes` (a Haiku
  {module: {name: ShapeDtypeStruct}} dict): kernels N(0, 1 / fan_in),
  BatchNorm variances in [0.5, 2], gains, scales and skip gains near 1,
  everything else (biases, offsets, moving means) small and non-zero. A
  compiled init costs ~10 s of CPU here (threefry); these cost nothing,
  and unlike an init they make every bias, skip gain and BatchNorm
  statistic take part."""
  rng = np.random.default_rng(seed)
  def value(name, shape):
    if name == 'w':
      return rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    if name == 'var':
      return rng.uniform(0.5, 2.0, shape)
    if name in ('gain', 'scale', 'multiplier') or name.endswith('skip_gain'):
      return 1 + 0.1 * rng.normal(size=shape)
    return 0.1 * rng.normal(size=shape)
  return {module: {name: np.asarray(value(name, leaf.shape), np.float32)
                   for name, leaf in entries.items()}
          for module, entries in shapes.items()}


def _params_and_state(model, images):
  shapes = jax.eval_shape(lambda rng: model.init(rng, images, False),
                          jax.random.key(0))
  return _random_values(shapes[0], 1), _random_values(shapes[1], 2)


@functools.cache
def _run(case: str, is_training: bool):
  """(config, params, state, logits, stats, features) of CASES[case] with
  _random_values parameters, numpy."""
  config, size = CASES[case][:2]
  model = models.build(config)
  images = _images(size)
  params, state = _params_and_state(model, images)
  rng = jax.random.key(3) if is_training else None

  @jax.jit
  def both(params, state, rng):
    return model.apply(params, state, rng, images, is_training,
                       return_stats=True, return_features=True)[0]

  outputs = jax.tree.map(np.asarray, both(params, state, rng))
  return (config, params, state) + outputs


@pytest.mark.parametrize('case', list(CASES))
def test_shapes_channels_and_stage_ends(case):
  _, size, stem_stride, strides, stem_channels, channels, final = CASES[case]
  config, params, state, logits, stats, features = _run(case, False)
  assert sorted(features) == sorted(KEYS)
  assert features['stem'].shape == (2, size // stem_stride,
                                    size // stem_stride, stem_channels)
  for stage, (stride, width) in enumerate(zip(strides, channels)):
    side = size // stride
    assert features[f'stage{stage + 1}'].shape == (2, side, side, width)
  assert features['final'].shape == features['stage4'].shape[:3] + (final,)
  assert features['pooled'].shape == (2, final)
  assert features['pooled'].dtype == np.float32
  # The stage outputs are the stage-end blocks' outputs: their statistics
  # are the signal statistics of those blocks (entry 0: the stem).
  ends = [spec.index + 1 for spec in models.block_plan(config)
          if spec.is_stage_end]
  for key, index in zip(KEYS[:5], [0] + ends):
    squared_mean, variance = signal_stats.channel_stats(features[key])
    np.testing.assert_allclose(
        [squared_mean, variance],
        [stats['squared_mean'][index], stats['variance'][index]], rtol=1e-5)
  # Pre-activation residual streams: not activated.
  assert all(features[f'stage{k}'].min() < 0 for k in range(1, 5))
  if case == 'nf_imagenet':  # asking for features changes no logit
    plain_logits, _ = jax.jit(models.build(config).apply, static_argnums=4)(
        params, state, None, _images(size), False)
    np.testing.assert_allclose(plain_logits, logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('case,is_training', [
    ('nf_imagenet', False), ('nf_cifar', False), ('bn_imagenet', False),
    ('regnet', False), ('regnet', True)])
def test_pooled_and_logits_follow_the_head(case, is_training):
  """'pooled' is the mean of 'final' over H, W; logits are pooled @ w + b
  (in training the NF-RegNet's dropout 0.2 acts after 'pooled' only)."""
  config, params, state, logits, _, features = _run(case, is_training)
  np.testing.assert_allclose(features['pooled'],
                             features['final'].mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)
  head = params[f'{"nf_regnet" if case == "regnet" else "resnet"}/classifier']
  linear = features['pooled'] @ head['w'] + head['b']
  if is_training:  # dropout zeroes some pooled features before the classifier
    assert not np.allclose(logits, linear, rtol=1e-3)
    return
  np.testing.assert_allclose(logits, linear, rtol=1e-5, atol=1e-5)
  # 'final' is the head's pre-activation of 'stage4'.
  stage4 = features['stage4']
  if config.name == 'nf_resnet':  # gamma * relu
    expected = resnet.NFParts(config, 1).activation(stage4)
  elif config.name == 'bn_resnet':  # relu(BatchNorm), moving statistics
    moving, affine = state['resnet/head_preact'], params['resnet/head_preact']
    expected = np.maximum(
        (stage4 - moving['mean']) / np.sqrt(moving['var'] + config.bn_eps)
        * affine['scale'] + affine['offset'], 0)
  else:
    return  # NF-RegNet: a head conv first; covered by the pooled check
  np.testing.assert_allclose(features['final'], expected, rtol=1e-5,
                             atol=1e-6)


def test_scanned_and_unrolled_blocks_give_equal_features():
  """The same parameters in the stacked layout, blocks 2-3 (the end of
  stage 2) run as one scan: the same features."""
  config, params, state, _, _, features = _run('nf_imagenet', False)
  scan_config = resnet.make_config(**{**config.to_dict(), 'block_loop': 'scan'})
  assert resnet.uses_scan(scan_config) and not resnet.uses_scan(config)
  scan_params = models.other_layouts(config)[0][0](params)
  assert 'resnet/stacked_block2_to_block3/conv1' in scan_params
  scanned, _ = jax.jit(models.build_backbone(scan_config).apply,
                       static_argnums=4)(scan_params, state, None,
                                         _images(64), False)
  for key in KEYS:
    np.testing.assert_allclose(scanned[key], features[key], rtol=2e-5,
                               atol=2e-5 * np.abs(features[key]).max())


@pytest.mark.parametrize('case', ['bn_imagenet', 'regnet'])
def test_backbone_has_no_classifier_and_takes_full_params(case):
  """build_backbone: the full model's parameter names less the classifier;
  it runs on the full model's parameters and gives its features."""
  config, size = CASES[case][:2]
  images = _images(size)
  backbone = models.build_backbone(config)
  _, params, state, _, _, features = _run(case, False)
  shapes, state_shapes = jax.eval_shape(
      lambda rng: backbone.init(rng, images, False), jax.random.key(0))
  assert set(params) - set(shapes) == {
      module for module in params if module.endswith('/classifier')}
  assert jax.tree.map(np.shape, shapes) == jax.tree.map(
      np.shape, {module: params[module] for module in shapes})
  assert jax.tree.map(np.shape, state_shapes) == jax.tree.map(np.shape, state)
  from_full, new_state = jax.jit(backbone.apply, static_argnums=4)(
      params, state, None, images, False)
  for key in KEYS:
    np.testing.assert_allclose(from_full[key], features[key], rtol=1e-6,
                               atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, new_state, state)


def test_nothing_to_return_is_a_user_error():
  config = CASES['nf_cifar'][0]
  def forward(images):
    return resnet.ResNet(config)(images, False, with_classifier=False)
  with pytest.raises(errors.UserError, match='with_classifier=False'):
    hk.transform_with_state(forward).init(jax.random.key(0), _images(32))


def _docs_block(text: str, marker: str) -> str:
  match = re.search(rf'<!-- {marker} -->\s*```python\n(.*?)```', text,
                    re.DOTALL)
  assert match, f'no {marker} block in docs/backbone.md'
  return match.group(1)


def test_docs_examples_run():
  """The python blocks after the backbone-example and
  backbone-module-example markers in docs/backbone.md, as written (they
  use tiny sizes themselves): the linear probe on build_backbone's
  features, and the same head on the ResNet module inside a Haiku
  function, which takes the pretrained parameters by name and gives the
  same logits."""
  text = (ROOT / 'docs' / 'backbone.md').read_text()
  namespace = {}
  exec(compile(_docs_block(text, 'backbone-example'), 'docs/backbone.md',  # pylint: disable=exec-used
               'exec'), namespace)
  logits, pooled = namespace['logits'], namespace['features']['pooled']
  assert logits.shape == (4, 5) and pooled.shape == (4, 128)
  head_params = namespace['head_params']
  head = head_params['new_head']
  np.testing.assert_allclose(logits, pooled @ head['w'] + head['b'],
                             rtol=1e-5, atol=1e-6)

  exec(compile(_docs_block(text, 'backbone-module-example'),  # pylint: disable=exec-used
               'docs/backbone.md', 'exec'), namespace)
  model = hk.transform_with_state(namespace['forward'])
  images, pretrained = namespace['images'], namespace['pretrained']
  shapes, _ = jax.eval_shape(lambda rng: model.init(rng, images, False),
                             jax.random.key(0))
  assert set(shapes) == (set(pretrained) - {'resnet/classifier'}
                         | {'new_head'})
  params = {**{module: pretrained[module] for module in shapes
               if module != 'new_head'}, **head_params}
  module_logits, _ = jax.jit(model.apply, static_argnums=4)(
      params, namespace['state'], None, images, False)
  np.testing.assert_allclose(module_logits, logits, rtol=1e-5, atol=1e-6)

"""Scanned blocks (nfnets.stacking): the scan groups and the 'auto' rule,
scanned == unrolled with layout conversion both ways, and a traced program
that does not grow with depth. (A scanned network's whole training step and
checkpoints: test_experiment.py.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import resnet
from nfnets import stacking


def _loop_config(name, block_loop, **overrides):
  return resnet.make_config(name=name, depths=(1, 3, 1, 1), width=1 / 16,
                            num_classes=10, block_loop=block_loop,
                            skip_gain_init=0.5, **overrides)


def test_scan_groups_are_the_runs_of_non_transition_blocks():
  plan = resnet.block_plan(resnet.make_config(depths=(1, 3, 2, 4)))
  # Stage starts (blocks 0, 1, 4, 6) are transitions; a lone block is not
  # worth a scan.
  assert stacking.scan_groups(plan) == [(2, 2), (7, 3)]
  # 'auto': unrolled in training however deep, scanned in forward-only
  # measurements beyond 32 blocks.
  assert not resnet.uses_scan(resnet.make_config(variant='ResNet600'))
  assert resnet.uses_scan(resnet.make_config(block_loop='scan'))
  assert not stacking.scans('auto', 200)
  assert stacking.scans('auto', 33, forward_only=True)
  assert not stacking.scans('auto', 32, forward_only=True)
  assert not stacking.scans('unrolled', 200, forward_only=True)
  with pytest.raises(ValueError, match="block_loop 'loop'.*allowed"):
    resnet.validate_config(resnet.make_config(block_loop='loop'))


@pytest.mark.parametrize('name', ['nf_resnet', 'bn_resnet', 'fixup_resnet'])
def test_scanned_blocks_equal_unrolled_ones(name):
  """One parameter tree for both loops; with the same parameters the
  outputs, signal statistics and BatchNorm state updates (and, for the NF
  net, the gradients) agree to float32 rounding."""
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  models = {loop: resnet.build(_loop_config(name, loop))
            for loop in ('unrolled', 'scan')}
  config = _loop_config(name, 'scan')
  params, state = jax.jit(models['unrolled'].init, static_argnums=2)(
      jax.random.key(0), images, True)
  scan_params, scan_state = jax.jit(models['scan'].init, static_argnums=2)(
      jax.random.key(0), images, True)
  # Stored stacked: blocks 2 and 3 (stage 2) as one module per kind.
  stacked = 'resnet/stacked_block2_to_block3/conv1'
  assert scan_params[stacked]['w'].shape == (2,) + params[
      'resnet/block2/conv1']['w'].shape
  assert not any('block2' in module.split('/') for module in scan_params)
  plan = resnet.block_plan(config)
  to_scan = functools.partial(stacking.convert_layout, plan=plan,
                              scanned=True)
  assert (jax.tree.map(np.shape, (scan_params, scan_state))
          == jax.tree.map(np.shape, to_scan((params, state))))
  back = stacking.convert_layout(to_scan(params), plan, scanned=False)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  results = {}
  for loop, model in models.items():
    convert = to_scan if loop == 'scan' else lambda tree: tree
    def loss(params, model=model, convert=convert):
      (logits, stats), new_state = model.apply(
          convert(params), convert(state), None, images, True, True)
      return jnp.sum(logits**2), (logits, stats, new_state)
    if name == 'nf_resnet':
      results[loop] = jax.jit(jax.grad(loss, has_aux=True))(params)
    else:
      results[loop] = jax.jit(loss)(params)[1]
  results['scan'] = stacking.convert_layout(results['scan'], plan,
                                            scanned=False)
  def close(scanned, unrolled):
    np.testing.assert_allclose(scanned, unrolled, rtol=2e-5,
                               atol=2e-5 * np.max(np.abs(unrolled)))
  jax.tree.map(close, results['scan'], results['unrolled'])


def test_scanned_trace_does_not_grow_with_depth():
  """What makes compile time independent of depth: the traced program of a
  scanned network has the same size at 3 and 30 blocks per stage."""
  images = jnp.zeros((2, 32, 32, 3))
  sizes = {}
  for depth in (3, 30):
    config = resnet.make_config(depths=(1, depth, 1, 1), width=1 / 16,
                                num_classes=10, block_loop='scan')
    model = resnet.build(config)
    params, state = jax.eval_shape(
        functools.partial(model.init, is_training=True),
        jax.random.key(0), images)
    jaxpr = jax.make_jaxpr(
        lambda p, s: model.apply(p, s, None, images, True))(params, state)
    # Stored stacked, the parameters are the same number of arrays too.
    sizes[depth] = (len(jaxpr.eqns), len(jax.tree.leaves(params)))
  assert sizes[3] == sizes[30], sizes

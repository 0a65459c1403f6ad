"""MixUp + CutMix (nfnets.mixing): mixed pixels and targets, the Beta and
box-area laws, pairs within each device's shard, determinism, dtypes and bad
input. (The loss on the mixed
targets: test_optim.py.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from nfnets import mixing
from helpers import mix_batch as _mix


def _indexed_batch(batch, size=16):
  """Image i is the constant i + 1 and has label i: every mixed pixel and
  target says which examples went into it."""
  images = jnp.broadcast_to(
      jnp.arange(1, batch + 1, dtype=jnp.float32)[:, None, None, None],
      (batch, size, size, 3))
  return images, jnp.arange(batch)


@functools.cache
def _mixed(batch, mixup_alpha, cutmix, seed=0, size=16):
  images, labels = _indexed_batch(batch, size)
  out, targets = _mix(seed, images, labels, batch,
                      mixup_alpha, cutmix)
  return np.asarray(images), np.asarray(out), np.asarray(targets)


def _own_and_partner_weights(targets):
  batch = targets.shape[0]
  rows = np.arange(batch)
  return targets[rows, rows], targets[rows, batch - 1 - rows]


def test_off_returns_images_untouched_and_one_hot_targets():
  images, labels = _indexed_batch(6)
  out, targets = mixing.mix_batch(0, images, labels, 9, 0.0,
                                  False)
  assert out is images
  np.testing.assert_array_equal(targets, np.eye(9)[np.arange(6)])
  assert targets.dtype == jnp.float32


@pytest.mark.parametrize('mixup_alpha,cutmix', [(0.2, True), (0.2, False),
                                                (0.0, True)])
def test_targets_are_distributions_over_the_pair(mixup_alpha, cutmix):
  _, _, targets = _mixed(64, mixup_alpha, cutmix)
  np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)
  own, partner = _own_and_partner_weights(targets)
  # All the mass is on the example's own label and its partner's (N-1-i).
  np.testing.assert_allclose(own + partner, 1.0, atol=1e-6)
  assert np.all(targets >= 0)


def test_mixup_half_blends_and_cutmix_half_pastes_the_labelled_area():
  batch = 64
  images, out, targets = _mixed(batch, 0.2, True)
  own, _ = _own_and_partner_weights(targets)
  value = images[:, 0, 0, 0]
  partner_value = value[::-1]
  half = batch // 2
  # MixUp (first half): every pixel is own * x_i + (1 - own) * x_partner.
  np.testing.assert_allclose(
      out[:half], (own[:half] * value[:half] + (1 - own[:half])
                   * partner_value[:half])[:, None, None, None]
      * np.ones_like(out[:half]), rtol=1e-5)
  # CutMix (second half): pixels are either the image's own or its
  # partner's, and the partner's label weight is exactly the pasted area.
  cut = out[half:, ..., 0]
  is_own = cut == value[half:, None, None]
  is_partner = cut == partner_value[half:, None, None]
  assert np.all(is_own | is_partner)
  np.testing.assert_allclose(is_partner.mean(axis=(1, 2)),
                             1 - own[half:], atol=1e-6)
  # Every channel is cut alike.
  assert np.all(out[half:] == out[half:, ..., :1])


def test_cutmix_pastes_one_rectangle():
  images, out, _ = _mixed(32, 0.0, True)
  partner_value = images[::-1, 0, 0, 0]
  for example in range(32):
    pasted = out[example, ..., 0] == partner_value[example]
    if example == 31 - example or not pasted.any():
      continue
    rows, cols = np.flatnonzero(pasted.any(1)), np.flatnonzero(pasted.any(0))
    assert pasted.sum() == len(rows) * len(cols)  # a full box
    assert np.ptp(rows) + 1 == len(rows) and np.ptp(cols) + 1 == len(cols)


def test_mixup_ratio_follows_beta_distribution():
  # Whole batch MixUp at two alphas: Kolmogorov-Smirnov against the Beta
  # law (fixed seed, so the test is deterministic).
  near_ends = {}
  for alpha in (0.2, 1.0):
    _, _, targets = _mixed(4096, alpha, False, size=4)
    own, _ = _own_and_partner_weights(targets)
    assert scipy_stats.kstest(own, scipy_stats.beta(alpha, alpha).cdf
                              ).pvalue > 0.01
    near_ends[alpha] = np.mean((own < 0.1) | (own > 0.9))
  # Beta(0.2, 0.2) puts most mass near 0 and 1 (0.67 within 0.1 of
  # them); Beta(1, 1) is uniform (0.2).
  assert near_ends[0.2] > 0.6 and near_ends[1.0] < 0.25


def test_cutmix_box_area_is_uniform_and_clipped():
  num, height, width = 4096, 32, 48
  area, top, left, bottom, right = mixing.sample_cutmix_boxes(
      np.random.default_rng(3), num, height, width)
  assert scipy_stats.kstest(area, 'uniform').pvalue > 0.01
  assert np.all((0 <= top) & (top <= bottom) & (bottom <= height))
  assert np.all((0 <= left) & (left <= right) & (right <= width))
  pasted = (bottom - top) * (right - left) / (height * width)
  # Clipping at the border only ever shrinks the box (up to rounding of
  # the sides to whole pixels).
  side_rounding = 1 / height + 1 / width
  assert np.all(pasted <= area + 2 * side_rounding)
  assert 0.2 < pasted.mean() < area.mean()
  masks = np.asarray(mixing.box_masks(top, left, bottom, right, height, width))
  np.testing.assert_allclose(masks.mean(axis=(1, 2)), pasted)


def test_deterministic_per_seed():
  images, labels = _indexed_batch(8)
  first = _mix(5, images, labels, 8, 0.2, True)
  again = _mix(5, images + 0, labels, 8, 0.2, True)
  other = _mix(6, images, labels, 8, 0.2, True)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(first[1], other[1])


def test_bfloat16_images_stay_bfloat16():
  images, labels = _indexed_batch(4)
  out, targets = _mix(0, images.astype(jnp.bfloat16), labels,
                      4, 0.2, True)
  assert out.dtype == jnp.bfloat16 and targets.dtype == jnp.float32


@pytest.mark.parametrize('change,message', [
    (dict(mixup_alpha=-0.2), 'mixup_alpha must be a number >= 0'),
    (dict(mixup_alpha=float('nan')), 'mixup_alpha must be a number >= 0'),
    (dict(cutmix=1), 'cutmix must be True or False, got 1'),
    (dict(num_classes=0), 'num_classes must be an integer >= 1, got 0'),
    (dict(labels=jnp.zeros((3,), jnp.int32)), r'labels must be \[N\]'),
    (dict(labels=jnp.zeros((4,))), 'labels must be integers'),
    (dict(images=jnp.zeros((4, 8, 8), jnp.float32)), 'images must be'),
    (dict(images=jnp.zeros((4, 8, 8, 3), jnp.uint8)),
     'images must be floating point'),
])
def test_bad_inputs_raise_clear_errors(change, message):
  images, labels = _indexed_batch(4)
  args = dict(seed=0, images=images, labels=labels,
              num_classes=4, mixup_alpha=0.2, cutmix=True)
  with pytest.raises(ValueError, match=message):
    mixing.mix_batch(**{**args, **change})


def test_draw_mix_lays_out_each_shard_half_mixup_half_cutmix():
  drawn = mixing.draw_mix(np.random.default_rng(0), 8, 4, 16, 16, 0.2, True)
  ratio = drawn['mix_ratio'].reshape(4, 8)
  box = drawn['mix_box'].reshape(4, 8, 4)
  assert ratio.dtype == np.float32 and box.dtype == np.int32
  # MixUp rows: a ratio in [0, 1] (Beta(0.2, 0.2) sits near the ends) and
  # an empty box; CutMix rows: ratio 1.
  assert np.all((ratio[:, :4] >= 0) & (ratio[:, :4] <= 1))
  assert np.mean(ratio[:, :4] < 1) > 0.5
  assert np.all(box[:, :4] == 0)
  assert np.all(ratio[:, 4:] == 1)
  assert np.all(box[:, 4:, 2] >= box[:, 4:, 0])
  assert np.any(box[:, 4:, 2] > box[:, 4:, 0])

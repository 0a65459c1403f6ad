"""MixUp and CutMix (the NF-RegNet recipe): ratios and boxes drawn on the
host, mixing on each device's own examples.

Reference recipe (deepmind-research nfnets/dataset.py, 'mixup_cutmix'): half
of each batch is MixUp with a per-example ratio ~ Beta(alpha, alpha), the
other half CutMix with a per-example box of area ~ Uniform(0, 1) (centre
uniform over the image, clipped at its border), labels mixed by the same
ratio (for CutMix by the actual pasted area).

Two parts, so that the train step moves no image between devices and runs
no sampling loop:
  draw_mix (host, numpy): per example a MixUp ratio and a CutMix box, laid
    out per device shard (first half of each shard MixUp, second half
    CutMix), from a numpy Generator the training loop seeds with (seed,
    step, process): deterministic and resumable.
  apply_mix (device, loop-free): inside each device's shard, example i is
    mixed with example n - 1 - i of the same shard.
The mixed batch therefore depends on how the global batch is split over
devices (the pairs are formed within each shard); the reference code mixed
within each device's batch too. mix_batch does both for one batch.

  images, targets = mix_batch(0, images, labels, 1000, 0.2, cutmix=True)
"""

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np


def partner_indices(batch_size: int) -> jax.Array:
  """The example each example is mixed with: i -> batch_size - 1 - i, [N]."""
  return jnp.arange(batch_size - 1, -1, -1)


def num_mixup_examples(batch_size: int, mixup_alpha: float,
                       cutmix: bool) -> int:
  """Examples [0, k) get MixUp, [k, N) CutMix: half each when both are on."""
  if mixup_alpha > 0 and cutmix:
    return batch_size // 2
  return batch_size if mixup_alpha > 0 else 0


def sample_mixup_ratios(rng: np.random.Generator, num: int,
                        mixup_alpha: float) -> np.ndarray:
  """Weights of each example's own image, ~ Beta(alpha, alpha), float32 [num]."""
  return rng.beta(mixup_alpha, mixup_alpha, num).astype(np.float32)


def sample_cutmix_boxes(rng: np.random.Generator, num: int, height: int,
                        width: int):
  """Random boxes to paste, as in CutMix (Yun et al. 2019).

  The nominal box has area fraction a ~ Uniform(0, 1) and the image's aspect
  ratio (sides round(sqrt(a) * H) and round(sqrt(a) * W) px); its centre is
  a uniformly random pixel; the box is clipped at the image border, so the
  pasted area is at most a.

  Returns:
    (area, top, left, bottom, right): area float32 [num] is the nominal a;
    the box is rows [top, bottom) and columns [left, right), int32 [num].
  """
  area = rng.uniform(size=num).astype(np.float32)
  side = np.sqrt(area)
  box_height = np.round(side * height).astype(np.int32)
  box_width = np.round(side * width).astype(np.int32)
  center_row = rng.integers(0, height, num)
  center_col = rng.integers(0, width, num)
  top = np.clip(center_row - box_height // 2, 0, height)
  left = np.clip(center_col - box_width // 2, 0, width)
  bottom = np.clip(center_row - box_height // 2 + box_height, 0, height)
  right = np.clip(center_col - box_width // 2 + box_width, 0, width)
  return area, *(a.astype(np.int32) for a in (top, left, bottom, right))


def draw_mix(rng: np.random.Generator, shard_size: int, num_shards: int,
             height: int, width: int, mixup_alpha: float,
             cutmix: bool) -> dict[str, np.ndarray]:
  """Host-side draws for a batch of num_shards device shards.

  Returns {'mix_ratio': float32 [num_shards * shard_size], the MixUp weight
  of each example's own image (1 on CutMix rows), 'mix_box': int32 [..., 4],
  the CutMix box (top, left, bottom, right) pasted from the partner (empty
  on MixUp rows)}. In each shard the first num_mixup_examples(shard_size)
  rows are MixUp, the rest CutMix.
  """
  _check_settings(mixup_alpha, cutmix)
  num_mixup = num_mixup_examples(shard_size, mixup_alpha, cutmix)
  ratio = np.ones((num_shards, shard_size), np.float32)
  box = np.zeros((num_shards, shard_size, 4), np.int32)
  if num_mixup:
    ratio[:, :num_mixup] = sample_mixup_ratios(
        rng, num_shards * num_mixup, mixup_alpha).reshape(num_shards, -1)
  if num_mixup < shard_size:
    _, *bounds = sample_cutmix_boxes(
        rng, num_shards * (shard_size - num_mixup), height, width)
    box[:, num_mixup:] = np.stack(bounds, -1).reshape(num_shards, -1, 4)
  return {'mix_ratio': ratio.reshape(-1), 'mix_box': box.reshape(-1, 4)}


def box_masks(top, left, bottom, right, height: int, width: int) -> jax.Array:
  """bool [num, height, width], True inside each box (int32 [num] bounds)."""
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  inside_rows = (rows >= top[:, None, None]) & (rows < bottom[:, None, None])
  inside_cols = (cols >= left[:, None, None]) & (cols < right[:, None, None])
  return inside_rows & inside_cols


def _check_settings(mixup_alpha, cutmix) -> None:
  if not (isinstance(mixup_alpha, numbers.Real) and math.isfinite(mixup_alpha)
          and mixup_alpha >= 0):
    raise ValueError(f'mixup_alpha must be a number >= 0 (0 = no MixUp), got '
                     f'{mixup_alpha!r}.')
  if not isinstance(cutmix, bool):
    raise ValueError(f'cutmix must be True or False, got {cutmix!r}.')


def _check_inputs(images, labels, num_classes) -> None:
  if images.ndim != 4:
    raise ValueError(f'images must be [N, H, W, C], got shape {images.shape}.')
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f'images must be floating point (mix after normalizing), '
                     f'got {images.dtype}.')
  if labels.shape != images.shape[:1]:
    raise ValueError(f'labels must be [N] = {images.shape[:1]}, got shape '
                     f'{labels.shape}.')
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f'labels must be integers, got {labels.dtype}.')
  if not (isinstance(num_classes, int) and num_classes >= 1):
    raise ValueError(f'num_classes must be an integer >= 1, got {num_classes}.')


def apply_mix(images: jax.Array, labels: jax.Array, num_classes: int,
              mix_ratio: jax.Array, mix_box: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
  """Mixes example i with example N - 1 - i of this batch (one device's
  shard), without loops: the partner's pixels inside mix_box, elsewhere
  mix_ratio * own + (1 - mix_ratio) * partner.

  Args:
    images: float [N, H, W, C] (already normalized).
    labels: int [N], in [0, num_classes).
    num_classes: K, the width of the targets.
    mix_ratio: float32 [N]; mix_box: int32 [N, 4] (draw_mix).

  Returns:
    (images, targets): images in the input dtype and shape; targets float32
    [N, K] summing to 1, the mixed one-hot labels, the own label weighted by
    mix_ratio times the share of pixels not pasted (label smoothing is the
    loss's job).
  """
  _check_inputs(images, labels, num_classes)
  batch, height, width, _ = images.shape
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  partner = partner_indices(batch)
  pasted = box_masks(*(mix_box[:, i] for i in range(4)), height, width)
  ratio = mix_ratio.astype(jnp.float32)
  r = ratio[:, None, None, None].astype(images.dtype)
  blended = r * images + (1 - r) * images[partner]
  mixed = jnp.where(pasted[..., None], images[partner], blended)
  own = ratio * (1 - jnp.mean(pasted, axis=(1, 2), dtype=jnp.float32))
  own = own[:, None]
  return mixed, own * targets + (1 - own) * targets[partner]


def mix_batch(seed: int, images: jax.Array, labels: jax.Array,
              num_classes: int, mixup_alpha: float, cutmix: bool
              ) -> tuple[jax.Array, jax.Array]:
  """MixUp on the first half of the batch and CutMix on the second half,
  pairs within the batch: draw_mix from numpy seed `seed`, then apply_mix.
  With mixup_alpha 0 and cutmix False the images come back untouched."""
  _check_settings(mixup_alpha, cutmix)
  _check_inputs(images, labels, num_classes)
  if mixup_alpha == 0 and not cutmix:
    return images, jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  batch, height, width, _ = images.shape
  drawn = draw_mix(np.random.default_rng(seed), batch, 1, height, width,
                   mixup_alpha, cutmix)
  return apply_mix(images, labels, num_classes, jnp.asarray(drawn['mix_ratio']),
                   jnp.asarray(drawn['mix_box']))

"""MixUp and CutMix on a global batch (the NF-RegNet recipe), pure JAX.

Reference recipe (deepmind-research nfnets/dataset.py, 'mixup_cutmix'): half
of each batch is MixUp with a per-example ratio ~ Beta(alpha, alpha), the
other half CutMix with a per-example box of area ~ Uniform(0, 1) (centre
uniform over the image, clipped at its border), labels mixed by the same
ratio (for CutMix by the actual pasted area).

Example i is always mixed with example N - 1 - i of the same batch: the
pairing is a fixed function of the global batch and all randomness comes
from one key, so the result does not depend on how the batch is later
sharded over devices or processes. The reference draws 2N examples to make N
mixed ones; mixing within the batch keeps the data pipeline unchanged and
uses every loaded image once as the main image (the partner was shuffled
independently, so the pairs are as random).

  images, targets = mix_batch(rng, images, labels, 1000, 0.2, cutmix=True)
"""

import math
import numbers

import jax
import jax.numpy as jnp


def partner_indices(batch_size: int) -> jax.Array:
  """The example each example is mixed with: i -> batch_size - 1 - i, [N]."""
  return jnp.arange(batch_size - 1, -1, -1)


def num_mixup_examples(batch_size: int, mixup_alpha: float,
                       cutmix: bool) -> int:
  """Examples [0, k) get MixUp, [k, N) CutMix: half each when both are on."""
  if mixup_alpha > 0 and cutmix:
    return batch_size // 2
  return batch_size if mixup_alpha > 0 else 0


def sample_mixup_ratios(rng: jax.Array, num: int,
                        mixup_alpha: float) -> jax.Array:
  """Weights of each example's own image, ~ Beta(alpha, alpha), float32 [num]."""
  return jax.random.beta(rng, mixup_alpha, mixup_alpha, (num,), jnp.float32)


def sample_cutmix_boxes(rng: jax.Array, num: int, height: int, width: int):
  """Random boxes to paste, as in CutMix (Yun et al. 2019).

  The nominal box has area fraction a ~ Uniform(0, 1) and the image's aspect
  ratio (sides round(sqrt(a) * H) and round(sqrt(a) * W) px); its centre is
  a uniformly random pixel; the box is clipped at the image border, so the
  pasted area is at most a.

  Returns:
    (area, top, left, bottom, right): area float32 [num] is the nominal a;
    the box is rows [top, bottom) and columns [left, right), int32 [num].
  """
  area_rng, row_rng, col_rng = jax.random.split(rng, 3)
  area = jax.random.uniform(area_rng, (num,), jnp.float32)
  side = jnp.sqrt(area)
  box_height = jnp.round(side * height).astype(jnp.int32)
  box_width = jnp.round(side * width).astype(jnp.int32)
  center_row = jax.random.randint(row_rng, (num,), 0, height)
  center_col = jax.random.randint(col_rng, (num,), 0, width)
  top = jnp.clip(center_row - box_height // 2, 0, height)
  left = jnp.clip(center_col - box_width // 2, 0, width)
  bottom = jnp.clip(center_row - box_height // 2 + box_height, 0, height)
  right = jnp.clip(center_col - box_width // 2 + box_width, 0, width)
  return area, top, left, bottom, right


def box_masks(top, left, bottom, right, height: int, width: int) -> jax.Array:
  """bool [num, height, width], True inside each box (int32 [num] bounds)."""
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  inside_rows = (rows >= top[:, None, None]) & (rows < bottom[:, None, None])
  inside_cols = (cols >= left[:, None, None]) & (cols < right[:, None, None])
  return inside_rows & inside_cols


def _check_inputs(images, labels, num_classes, mixup_alpha, cutmix) -> None:
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
  if not (isinstance(mixup_alpha, numbers.Real) and math.isfinite(mixup_alpha)
          and mixup_alpha >= 0):
    raise ValueError(f'mixup_alpha must be a number >= 0 (0 = no MixUp), got '
                     f'{mixup_alpha!r}.')
  if not isinstance(cutmix, bool):
    raise ValueError(f'cutmix must be True or False, got {cutmix!r}.')


def mix_batch(rng: jax.Array, images: jax.Array, labels: jax.Array,
              num_classes: int, mixup_alpha: float, cutmix: bool
              ) -> tuple[jax.Array, jax.Array]:
  """MixUp on the first half of the batch and CutMix on the second half.

  Args:
    rng: a JAX key; the same key and batch give the same result.
    images: float [N, H, W, C] (already normalized), the global batch.
    labels: int [N], in [0, num_classes).
    num_classes: K, the width of the targets.
    mixup_alpha: Beta(alpha, alpha) parameter of the MixUp ratio; 0 = no
      MixUp. Static (a Python number).
    cutmix: whether to apply CutMix. Static. With only one of the two on it
      covers the whole batch; with neither, images come back untouched.

  Returns:
    (images, targets): images in the input dtype and shape; targets float32
    [N, K] summing to 1, the mixed one-hot labels (label smoothing is the
    loss's job).
  """
  _check_inputs(images, labels, num_classes, mixup_alpha, cutmix)
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if mixup_alpha == 0 and not cutmix:
    return images, targets
  batch, height, width, _ = images.shape
  partner = partner_indices(batch)
  partner_images, partner_targets = images[partner], targets[partner]
  num_mixup = num_mixup_examples(batch, mixup_alpha, cutmix)
  mixup_rng, cutmix_rng = jax.random.split(rng)

  mixed_images, own_weights = [], []
  if num_mixup:
    ratio = sample_mixup_ratios(mixup_rng, num_mixup, mixup_alpha)
    r = ratio[:, None, None, None].astype(images.dtype)
    mixed_images.append(r * images[:num_mixup]
                        + (1 - r) * partner_images[:num_mixup])
    own_weights.append(ratio)
  if num_mixup < batch:
    _, top, left, bottom, right = sample_cutmix_boxes(
        cutmix_rng, batch - num_mixup, height, width)
    pasted = box_masks(top, left, bottom, right, height, width)
    mixed_images.append(jnp.where(pasted[..., None],
                                  partner_images[num_mixup:],
                                  images[num_mixup:]))
    # The label weight is the pasted area itself, after clipping.
    own_weights.append(1 - jnp.mean(pasted, axis=(1, 2), dtype=jnp.float32))
  own = jnp.concatenate(own_weights)[:, None]
  return (jnp.concatenate(mixed_images),
          own * targets + (1 - own) * partner_targets)

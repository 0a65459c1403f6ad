"""Optimizer and loss of the training recipe, all from optax.

SGD with Nesterov momentum, weight decay masked off gains, biases and
scalars, linear warmup then cosine decay to optim.end_learning_rate,
learning rate scaled by batch / 256, optional adaptive gradient clipping
(classifier excluded); masks and clipping work per layer on stacked
parameters (nfnets/stacking.py).
"""

import jax
import jax.numpy as jnp
import optax

from nfnets import stacking


def learning_rate_schedule(optim_config, batch_size: int, total_steps: int,
                           steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine decay to end_learning_rate.

  Peak = base_learning_rate * batch_size / 256 when scale_by_batch_size;
  optim_config.end_learning_rate is absolute (not scaled by the batch):
  0 for the ResNets, 0.001 for the reference NF-RegNets.
  """
  peak = optim_config.base_learning_rate
  if optim_config.scale_by_batch_size:
    peak *= batch_size / 256
  end = optim_config.end_learning_rate
  if not 0 <= end <= peak:
    raise ValueError(f'optim.end_learning_rate must be in [0, peak learning '
                     f'rate {peak:g}], got {end}.')
  warmup_steps = int(round(optim_config.warmup_epochs * steps_per_epoch))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=end)


def _path_names(path) -> list[str]:
  return [str(getattr(key, 'key', key)) for key in path]


def weight_decay_mask(params):
  """True for conv and linear kernels (ndim > 1 per layer); False for gains,
  biases, BatchNorm scales and offsets, skip gains and other scalars.
  Stacked values (nfnets/stacking.py) have a leading layer axis."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim - stacking.is_stacked(path) > 1, params)


def agc_mask(params):
  """AGC on everything but the classifier (paper: clipping it hurts)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any('classifier' in n for n in _path_names(path)),
      params)


def adaptive_grad_clip(clipping: float) -> optax.GradientTransformation:
  """optax.adaptive_grad_clip with unit-wise norms per layer: a stacked
  [L, H, W, I, O] kernel (nfnets/stacking.py) is L kernels, not one 5-D
  one, and a stacked [L] gain is L scalars."""
  clip = optax.adaptive_grad_clip(clipping)

  def update(updates, state, params=None):
    def clip_one(path, update, param):
      clip_layer = lambda u, p: clip.update(u, state, p)[0]
      if stacking.is_stacked(path):
        return jax.vmap(clip_layer)(update, param)
      return clip_layer(update, param)
    return jax.tree_util.tree_map_with_path(clip_one, updates, params), state

  return optax.GradientTransformation(clip.init, update)


def make_optimizer(optim_config, schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
  chain = []
  if optim_config.agc_clipping:
    chain.append(optax.masked(adaptive_grad_clip(optim_config.agc_clipping),
                              agc_mask))
  if optim_config.weight_decay:
    chain.append(optax.add_decayed_weights(optim_config.weight_decay,
                                           mask=weight_decay_mask))
  chain.append(optax.sgd(schedule, momentum=optim_config.momentum,
                         nesterov=optim_config.nesterov))
  return optax.chain(*chain)


def classification_loss(logits: jax.Array, labels_or_targets: jax.Array,
                        label_smoothing: float) -> jax.Array:
  """Per-example cross entropy, float32 [N].

  Args:
    logits: [N, K].
    labels_or_targets: int labels [N], or float targets [N, K] (rows summing
      to 1, e.g. MixUp/CutMix labels from nfnets.mixing).
    label_smoothing: s; the targets become (1 - s) * targets + s / K.
  """
  if labels_or_targets.ndim == 1 and jnp.issubdtype(labels_or_targets.dtype,
                                                    jnp.integer):
    targets = jax.nn.one_hot(labels_or_targets, logits.shape[-1],
                             dtype=jnp.float32)
  elif (labels_or_targets.shape == logits.shape
        and jnp.issubdtype(labels_or_targets.dtype, jnp.floating)):
    targets = labels_or_targets.astype(jnp.float32)
  else:
    raise ValueError(
        f'Expected int labels [{logits.shape[0]}] or float targets '
        f'{list(logits.shape)}, got {labels_or_targets.dtype} '
        f'{list(labels_or_targets.shape)}.')
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Per-example 1.0 if the label is among the k largest logits, [N]."""
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)

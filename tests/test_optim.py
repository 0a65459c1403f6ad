"""nfnets.optim: the learning-rate schedule and the label-smoothed
classification loss, on integer labels and on MixUp/CutMix soft targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from nfnets import optim
from helpers import mix_batch as _mix


def test_loss_accepts_labels_or_soft_targets_with_smoothing():
  logits = jax.random.normal(jax.random.key(0), (5, 4))
  labels = jnp.array([0, 3, 1, 1, 2])
  one_hot = jax.nn.one_hot(labels, 4)
  for smoothing in (0.0, 0.1):
    np.testing.assert_allclose(
        optim.classification_loss(logits, labels, smoothing),
        optim.classification_loss(logits, one_hot, smoothing), rtol=1e-6)
  soft = jnp.array([[0.3, 0.7, 0, 0]] * 5)
  smoothed = 0.9 * soft + 0.1 / 4
  expected = -jnp.sum(smoothed * jax.nn.log_softmax(logits), axis=-1)
  np.testing.assert_allclose(optim.classification_loss(logits, soft, 0.1),
                             expected, rtol=1e-5)
  with pytest.raises(ValueError, match=r'int labels \[5\] or float targets'):
    optim.classification_loss(logits, jnp.zeros((5, 3)), 0.0)


def test_schedule_decays_to_end_learning_rate():
  config = base.get_base_config().optim
  assert float(optim.learning_rate_schedule(config, 256, 100, 2)(100)) == 0.0
  config.end_learning_rate = 0.001
  schedule = optim.learning_rate_schedule(config, 1024, 100, 2)
  assert float(schedule(10)) == pytest.approx(0.4)
  assert float(schedule(100)) == pytest.approx(0.001)
  assert float(schedule(55)) == pytest.approx(0.001 + 0.399 / 2, rel=1e-3)
  config.end_learning_rate = 1.0
  with pytest.raises(ValueError, match='end_learning_rate must be in'):
    optim.learning_rate_schedule(config, 256, 100, 2)


def test_mixed_targets_train_a_linear_model():
  """The soft-target loss goes down on mixed batches (gradient sanity)."""
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(3, 8, 8, 1)).astype(np.float32) * 2
  labels = jnp.asarray(rng.integers(0, 3, 64))
  images = jnp.asarray(centers[np.asarray(labels)])
  images, targets = _mix(1, images, labels, 3, 0.2, True)
  params = jnp.zeros((64, 3))

  def loss(w):
    logits = images.reshape(64, -1) @ w
    return optim.classification_loss(logits, targets, 0.1).mean()

  losses = []
  for _ in range(20):
    value, grad = jax.value_and_grad(loss)(params)
    losses.append(float(value))
    params = params - 0.05 * grad
  assert losses[-1] < 0.8 * losses[0]

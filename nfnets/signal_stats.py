"""The statistics of a Signal Propagation Plot, computed inside a forward pass.

Every model family (and any user model measured with nfnets.spp) reports the
same dict, all float32:
  'squared_mean' [num_blocks + 1]: average channel squared mean of the stem
      output (entry 0) and of every residual block's output after the
      addition;
  'variance' [num_blocks + 1]: average channel variance of the same tensors;
  'residual_variance' [num_blocks]: average channel variance of every
      residual branch's output, before stochastic depth, skip gain and alpha.
Statistics are over the local batch and all positions (N, H, W).
"""

import jax
import jax.numpy as jnp

from nfnets import layers

STAT_KEYS = ('squared_mean', 'variance', 'residual_variance')


def channel_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x: [N, H, W, C] -> (average channel squared mean, average channel var).

  Per channel, the mean and variance over N, H, W; then the average over
  channels of the squared mean and of the variance. Float32 scalars.
  """
  x = x.astype(jnp.float32)
  mean = layers.channel_means(x)
  # Two passes (not E[x^2] - E[x]^2), so a large mean does not cancel.
  centered = x - mean
  var = layers.channel_means(centered * centered)
  return jnp.mean(mean**2), jnp.mean(var)


class SignalRecorder:
  """Collects the statistics block by block, so no activation is kept alive.

  Inside any forward function (Haiku or not):
    recorder = SignalRecorder()
    recorder.record_stem(x)                   # once, before the first block
    recorder.record_block(x, branch)          # after every residual block
    return recorder.stats()                   # the dict described above
  """

  def __init__(self):
    self._squared_means, self._variances, self._residual_variances = [], [], []

  def record_stem(self, x: jax.Array) -> None:
    """x: [N, H, W, C], the input of the first residual block."""
    if self._squared_means:
      raise ValueError('record_stem must be called once, before any block.')
    self._record(x)

  def record_block(self, output: jax.Array, branch: jax.Array) -> None:
    """output: the block output after the addition; branch: the residual
    branch's output before any scaling; both [N, H, W, C]."""
    if not self._squared_means:
      raise ValueError('record_stem must be called before record_block.')
    self._record(output)
    self._residual_variances.append(channel_stats(branch)[1])

  def record_blocks(self, squared_means: jax.Array, variances: jax.Array,
                    residual_variances: jax.Array) -> None:
    """Statistics of several consecutive blocks computed elsewhere (e.g.
    the per-layer outputs of a scan): three float32 [num_blocks] arrays, the
    channel_stats of each block's output and its branch's variance."""
    if not self._squared_means:
      raise ValueError('record_stem must be called before record_blocks.')
    self._squared_means.append(squared_means)
    self._variances.append(variances)
    self._residual_variances.append(residual_variances)

  def _record(self, x):
    squared_mean, variance = channel_stats(x)
    self._squared_means.append(squared_mean)
    self._variances.append(variance)

  def stats(self) -> dict[str, jax.Array]:
    if not self._residual_variances:
      raise ValueError('No residual block was recorded.')
    # Entries are scalars (one block) or [n] arrays (record_blocks).
    def concatenate(entries):
      return jnp.concatenate([jnp.atleast_1d(entry) for entry in entries])
    return dict(squared_mean=concatenate(self._squared_means),
                variance=concatenate(self._variances),
                residual_variance=concatenate(self._residual_variances))

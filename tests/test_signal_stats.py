"""The statistics of a Signal Propagation Plot (nfnets.signal_stats)
against float64 numpy. (The plots themselves: test_spp.py.)"""

import numpy as np


def test_channel_stats_match_float64_numpy_despite_a_large_mean():
  """The SPP's per-channel statistics (a reshaped two-pass reduction) agree
  with numpy's in float64, also where the mean dwarfs the spread (a
  one-pass E[x^2] - E[x]^2 would cancel here)."""
  from nfnets import signal_stats  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(4, 9, 7, 5)) * np.array([1, 2, 3, 4, 5]) * 1e-2
       + np.array([300.0, -200, 250, 280, 310]))
  squared_mean, variance = signal_stats.channel_stats(x.astype(np.float32))
  np.testing.assert_allclose(squared_mean,
                             np.mean(x.mean(axis=(0, 1, 2))**2), rtol=1e-6)
  np.testing.assert_allclose(variance, np.mean(x.var(axis=(0, 1, 2))),
                             rtol=1e-5)

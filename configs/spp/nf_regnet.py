"""NF-RegNet-B0 at initialization: Signal Propagation Plot (about a minute).

  python spp.py --config=configs/spp/nf_regnet.py

B0 (alpha 0.2) with the branch input act(x / beta) (the paper's form, the
default), the same with the authors' act(x) / beta, and B0 with alpha 1
(which makes the per-block growth visible, as in the paper's Figure 2);
skip gain 1 so that every branch contributes, at B0's 192 px train
resolution. Results and their reading: docs/regnets.md.
"""

import ml_collections

from nfnets import regnet


def get_config():
  config = ml_collections.ConfigDict()
  config.title = 'NF-RegNet-B0 at init, N(0, 1) input, 192 px, skip gain 1'
  config.image_size = 192  # B0's train resolution
  config.batch_size = 8
  config.seed = 0
  config.output_dir = 'runs/spp/nf_regnet'
  # SPPs run the model in training mode without an RNG: no stochastic
  # depth or dropout.
  common = dict(variant='B0', skip_gain_init=1.0, stochastic_depth_rate=0.0,
                dropout_rate=0.0)
  config.models = ml_collections.ConfigDict({
      'nf_regnet_b0': regnet.make_config(alpha=0.2, **common),
      'nf_regnet_b0_beta_after_act': regnet.make_config(
          alpha=0.2, beta_placement='after_activation', **common),
      'nf_regnet_b0_alpha1': regnet.make_config(alpha=1.0, **common),
  })
  return config

"""Paper appendix Figure 7: NF-ResNet-600 without ReLU, against the same net with.

Both are alpha = 1 NF-ResNet-600s with plain (not Scaled-WS) convolutions
and skip gains 1, as the He-init network of Figure 2; the identity-fed
convs get fan-in scale 1 (conv_init='variance_preserving'), the ReLU-fed
ones He's factor 2, so both branches preserve the second moment. The paper
shows the linear network's squared channel mean staying near 0. Here the
stem's 3x3 max-pool already gives every channel a positive mean (squared
mean 6x the variance at the stem output); linear blocks carry that ratio
along instead of adding to it, ReLU blocks add to it (measured numbers in
docs/signal_propagation.md).

N(0, 1) input at 256 px, batch 8: 8 x 8 x 8 = 512 samples per channel in the
last stage, plenty for averages over 512-2048 channels, and one quarter of
the 512 px compute of Figures 1-2, so the preset runs in about 3 minutes on
2 CPU cores. At 256 px the last stage is 8 x 8, where SAME zero padding
changes every branch's variance (see docs/signal_propagation.md, last
stages).
"""

import ml_collections

from nfnets import resnet


def get_config():
  config = ml_collections.ConfigDict()
  config.title = 'NF-ResNet-600 (alpha = 1, plain convs) at init (paper Fig. 7)'
  config.image_size = 256
  config.batch_size = 8
  config.seed = 0
  config.output_dir = 'runs/spp/fig7'
  nf = dict(name='nf_resnet', variant='ResNet600', alpha=1.0,
            skip_gain_init=1.0, use_scaled_ws=False)
  config.models = ml_collections.ConfigDict({
      'nf_identity': resnet.make_config(activation='identity', **nf),
      'nf_relu': resnet.make_config(activation='relu', **nf),
  })
  return config

"""Paper appendix Figure 7: NF-ResNet-600 without ReLU, against the same net with.

Both are alpha = 1 NF-ResNet-600s with plain (not Scaled-WS) convolutions
and skip gains 1, as the He-init network of Figure 2. With the identity
nonlinearity the conv inputs have zero mean, so nothing shifts the channel
means: the squared channel mean stays near 0 and the residual variance
fluctuates around 1 (variance-preserving init: fan-in scale 1 for an
identity input, He's factor 2 for a ReLU input). With ReLU, its positive
mean (1/sqrt(2 pi) for a unit Gaussian) turns into growing channel means.

N(0, 1) input at 256 px, batch 8: 8 x 8 x 8 = 512 samples per channel in the
last stage, plenty for averages over 512-2048 channels, and one quarter of
the 512 px compute of Figures 1-2, so the preset runs in about 3 minutes on
2 CPU cores. At 256 px the last stage is 8 x 8, where SAME zero padding
lowers every branch's variance (see docs/signal_propagation.md, stage 4);
the mean-shift comparison does not depend on it.
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

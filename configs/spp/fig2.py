"""Paper Figure 2: NF-ResNet-600 (alpha 1), He-init convs against Scaled WS.

The ReLU-BN-Conv BatchNorm ResNetV2-600 (variance-preserving init: its
branches have variance 1, like the NF branches) is the reference; N(0, 1)
input at 512 px; skip gains are 1 so that every branch contributes at init.
"""

import ml_collections

from nfnets import resnet


def get_config():
  config = ml_collections.ConfigDict()
  config.title = 'NF-ResNet-600 (alpha = 1) at init (paper Fig. 2)'
  config.image_size = 512
  # As in fig1: 2048 samples per channel in the last stage, about a minute
  # and a half per model on 2 CPU cores, under 4 GB of memory.
  config.batch_size = 8
  config.seed = 0
  config.output_dir = 'runs/spp/fig2'
  nf = dict(name='nf_resnet', variant='ResNet600', alpha=1.0,
            skip_gain_init=1.0)
  config.models = ml_collections.ConfigDict({
      'relu_bn_conv': resnet.make_config(
          name='bn_resnet', variant='ResNet600', bn_order='relu_bn_conv'),
      'nf_he_init': resnet.make_config(use_scaled_ws=False, **nf),
      'nf_scaled_ws': resnet.make_config(use_scaled_ws=True, **nf),
  })
  return config

"""Paper Figure 1: BatchNorm ResNetV2-600, BN-ReLU-Conv against ReLU-BN-Conv.

ReLU, N(0, 1) input at 512 px, BatchNorm in training mode. Convs fed by a
ReLU are He-initialized; in ReLU-BN-Conv they are fed by BatchNorm and get
fan-in scale 1 (conv_init='variance_preserving'), so its branches have
variance 1 as in the paper. Add conv_init='he' for the old factor 2.
"""

import ml_collections

from nfnets import resnet


def get_config():
  config = ml_collections.ConfigDict()
  config.title = 'BN ResNetV2-600 at init (paper Fig. 1)'
  config.image_size = 512
  # 8 images give 8 x 16 x 16 = 2048 samples per channel in the last stage,
  # ample for the averages, and keep a forward pass at 512 px (about 460
  # GFLOPs per image) near a minute and a half on 2 CPU cores and under
  # 4 GB of memory. BatchNorm needs at least 2.
  config.batch_size = 8
  config.seed = 0
  config.output_dir = 'runs/spp/fig1'
  config.models = ml_collections.ConfigDict({
      order: resnet.make_config(name='bn_resnet', variant='ResNet600',
                                bn_order=order)
      for order in resnet.BN_ORDERS})
  return config

"""A shallow, narrow version of Figures 1 and 2 at 64 px: under a minute."""

import ml_collections

from nfnets import resnet


def get_config():
  config = ml_collections.ConfigDict()
  config.title = 'Shallow ResNets at init (quick preset)'
  config.image_size = 64
  config.batch_size = 16
  config.seed = 0
  config.output_dir = 'runs/spp/quick'
  shape = dict(depths=(3, 3, 3, 3), width=0.25)
  config.models = ml_collections.ConfigDict({
      'bn_relu_conv': resnet.make_config(name='bn_resnet',
                                         bn_order='bn_relu_conv', **shape),
      'relu_bn_conv': resnet.make_config(name='bn_resnet',
                                         bn_order='relu_bn_conv', **shape),
      'nf_he_init': resnet.make_config(use_scaled_ws=False, alpha=1.0,
                                       skip_gain_init=1.0, **shape),
      'nf_scaled_ws': resnet.make_config(alpha=1.0, skip_gain_init=1.0,
                                         **shape),
  })
  return config

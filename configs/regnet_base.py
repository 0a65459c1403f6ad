"""The NF-RegNet ImageNet recipe for any variant B0-B8.

Every value below comes from the authors' reference code (deepmind-research
nfnets/experiment_nf_regnets.py, nf_regnet.py, base.py and dataset.py;
the paper's NF-RegNet experiments) unless its comment says otherwise.
Everything not set here is the base recipe of configs/base.py (SGD +
Nesterov 0.9, 5 warmup epochs, weight decay off gains/biases/scalars, fp32).
"""

import ml_collections

from configs import base
from nfnets import regnet

# experiment_nf_regnets.py: 5e-5 + 1e-5 per level up to B5. The reference
# defines no value for B6-B8; we keep B5's 1e-4.
WEIGHT_DECAY = {'B0': 5e-5, 'B1': 6e-5, 'B2': 7e-5, 'B3': 8e-5, 'B4': 9e-5,
                'B5': 1e-4, 'B6': 1e-4, 'B7': 1e-4, 'B8': 1e-4}
# dataset.py's eval crop: the short side is cropped to test / (test + 32)
# before resizing to the test resolution (224 / 256 = 0.875 for B0).
EVAL_CROP_PADDING_PX = 32


def nf_regnet_imagenet(variant: str) -> ml_collections.ConfigDict:
  """The ImageNet recipe for NF-RegNet-<variant>, e.g. 'B0'."""
  if variant not in regnet.VARIANTS:
    raise ValueError(f'Unknown NF-RegNet variant {variant!r}; allowed: '
                     f'{tuple(regnet.VARIANTS)}.')
  shape = regnet.VARIANTS[variant]
  config = base.get_base_config()
  config.model = regnet.default_config()
  config.model.update(dict(
      variant=variant,
      width=0.75,                 # model_kwargs width
      expansion=2.25,             # model_kwargs expansion
      group_width=8,              # NF_RegNet group_size
      use_se=True,                # every reference block has SE
      se_ratio=0.5,               # model_kwargs se_ratio
      alpha=0.2,                  # model_kwargs alpha
      activation='silu',          # model_kwargs activation
      beta_placement='after_activation',  # nf_regnet.py: act(x) * (1 / std)
      skip_gain_init=0.0,         # reference skip_gain init zeros
      stochastic_depth_rate=0.1,  # model_kwargs stochdepth_rate
      stochastic_depth_scale_by_keep=False,  # base.StochDepth default
      dropout_rate=shape.dropout_rate,  # base.nf_regnet_params drop_rate
  ))
  config.data.image_size = shape.train_image_size       # train_imsize
  config.data.eval_image_size = shape.test_image_size   # test_imsize
  config.data.eval_crop_fraction = shape.test_image_size / (
      shape.test_image_size + EVAL_CROP_PADDING_PX)
  config.train.batch_size = 1024        # train_batch_size
  config.train.epochs = 360             # num_epochs
  config.train.mixup_alpha = 0.2        # dataset.py mixup_alpha default
  config.train.cutmix = True            # augment_name='mixup_cutmix'
  # Peak lr 0.4 whatever the batch (reference lr=0.4 at batch 1024,
  # lr_scale_by_bs=False); rescale it yourself for other batch sizes. Not
  # scaled, it also stays above the 0.001 floor at any batch size.
  config.optim.base_learning_rate = 0.4
  config.optim.scale_by_batch_size = False
  config.optim.warmup_epochs = 5.0      # warmup_steps=5*steps_per_epoch
  config.optim.end_learning_rate = 0.001  # WarmupCosineDecay min_val
  config.optim.momentum = 0.9           # SGD momentum
  config.optim.nesterov = True          # SGD nesterov
  config.optim.weight_decay = WEIGHT_DECAY[variant]
  config.optim.label_smoothing = 0.1    # label_smoothing
  config.optim.ema_decay = 0.99999      # ema_decay ("cinco nueves")
  return config

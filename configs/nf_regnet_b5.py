"""NF-RegNet-B5 on ImageNet: the reference recipe (see configs/regnet_base.py)."""

from configs import regnet_base


def get_config():
  return regnet_base.nf_regnet_imagenet('B5')

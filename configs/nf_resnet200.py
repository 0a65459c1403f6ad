"""NF-ResNet-200 on ImageNet: the full recipe (see configs/base.py)."""

from configs import base


def get_config():
  return base.nf_resnet_imagenet('ResNet200')

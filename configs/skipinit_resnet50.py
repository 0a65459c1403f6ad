"""SkipInit ResNet-50 (unnormalized, zero-init scalar branch gain) on ImageNet."""

from configs import base


def get_config():
  return base.baseline_imagenet('skipinit_resnet', skip_gain_init=0.0)

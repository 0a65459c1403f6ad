"""SkipInit ResNet (no normalization, skip gains init 0) on CIFAR-10
(configs/cifar10/base.py has the shared values)."""

from configs.cifar10 import base


def get_config():
  return base.cifar10_config('skipinit_resnet', skip_gain_init=0.0)

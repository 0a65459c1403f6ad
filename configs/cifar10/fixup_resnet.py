"""Fixup ResNet on CIFAR-10 (configs/cifar10/base.py has the shared values)."""

from configs.cifar10 import base


def get_config():
  return base.cifar10_config('fixup_resnet')

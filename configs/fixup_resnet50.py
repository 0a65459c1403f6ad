"""Fixup ResNet-50 (unnormalized, scalar biases, rescaled init) on ImageNet."""

from configs import base


def get_config():
  return base.baseline_imagenet('fixup_resnet')

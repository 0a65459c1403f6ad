"""BatchNorm ResNetV2 (BN-ReLU-Conv) on CIFAR-10, the NF-ResNet's baseline
(configs/cifar10/base.py has the shared values)."""

from configs.cifar10 import base


def get_config():
  # --config.model.bn_order=relu_bn_conv for the other ordering.
  return base.cifar10_config('bn_resnet', bn_order='bn_relu_conv')

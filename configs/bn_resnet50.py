"""BatchNorm ResNetV2-50 (BN-ReLU-Conv, He et al. 2016) on ImageNet."""

from configs import base


def get_config():
  # bn_order='relu_bn_conv' gives the ordering the paper's SPPs favour.
  return base.baseline_imagenet('bn_resnet', bn_order='bn_relu_conv')

"""timm's nf_resnet101 as an nfnets config (see configs/nf_resnet50_timm.py;
timm publishes no ImageNet weights for it)."""

from configs import nf_resnet50_timm


def get_config():
  return nf_resnet50_timm.timm_imagenet('nf_resnet101')

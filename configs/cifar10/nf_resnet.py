"""NF-ResNet on CIFAR-10 (configs/cifar10/base.py has the shared values).

  python -m nfnets.prepare_cifar10       # once: data/cifar10
  python train.py --config=configs/cifar10/nf_resnet.py --workdir=runs/c10_nf
"""

from configs.cifar10 import base


def get_config():
  return base.cifar10_config(
      'nf_resnet',
      alpha=0.2,            # the paper's value for every NF-ResNet
      skip_gain_init=0.0)   # zero-init skip gains, as the paper trains them

"""The CIFAR-10 studies' shared recipe (docs/studies/README.md).

The NF-ResNet of configs/cifar10/nf_resnet.py (every baseline is the same
config with model.name and its fields swept), made cheap enough that a
study of 18-30 runs fits in about an hour on 2 CPU cores. The values
were fixed before any study ran; the reason is beside each.
"""

from configs.cifar10 import base


def get_config():
  config = base.cifar10_config('nf_resnet', alpha=0.2, skip_gain_init=0.0)
  # 7x7/2 conv + max-pool: stage 1 at 8 x 8, about 3x cheaper per image than
  # 'cifar_stride2' on 2 cores, which is what lets 5 methods x 3 depths x 2
  # seeds run on all 50,000 training images within the budget.
  config.model.stem = 'imagenet'
  config.train.update(dict(
      epochs=4,                # the whole training set 4 times per run
      log_every_steps=50,      # a train curve for every batch size
      checkpoint_every_steps=2000))  # batch 4 runs 50,000 steps
  # A short warmup to match the short schedule (cosine decay to 0 after it).
  config.optim.warmup_epochs = 0.5
  return config

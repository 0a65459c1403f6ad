"""What the CIFAR-10 configs share: data, schedule and a small network.

Each value is chosen so that a full run takes minutes on 2 CPU cores while
the network still learns the data set well enough for the methods to
differ; the reason is beside each value.
"""

from configs import base
from nfnets import cifar10


def cifar10_config(model_name: str, **model_overrides):
  config = base.get_base_config()
  config.eval_split = 'test'  # CIFAR-10 has train and test splits only
  config.model.update(dict(
      name=model_name,
      depths=(1, 1, 1, 1),     # one block per stage: 4 transition blocks
      width=0.25,              # 16 stem, 64/128/256/512 stage channels
      num_classes=10,
      # 3x3/2 conv, no max-pool: stage 1 at 16 x 16 (the ImageNet stem would
      # leave 8 x 8, the stride-1 'cifar' stem costs 4x more per image).
      stem='cifar_stride2',
      dropout_rate=0.0,        # equal regularization for every method:
      stochastic_depth_rate=0.0,  # none, as in the paper's comparisons
      **model_overrides))
  config.data.update(dict(
      name='cifar10',
      # Where python -m nfnets.prepare_cifar10 puts it by default.
      data_dir=cifar10.DEFAULT_DIR,
      image_size=32, eval_image_size=0, num_classes=10,
      num_workers=0,           # in-memory arrays: batches cut in-process
      augment=True,            # random horizontal flip
      random_shift_px=4))      # random crop of the 4 px zero-padded image
  config.train.update(dict(
      batch_size=128,          # the usual CIFAR batch; 390 steps per epoch
      eval_batch_size=500,     # divides the 10,000 test images
      epochs=15,               # minutes on 2 cores; the standard 200 are hours
      log_every_steps=200, eval_every_steps=0,
      checkpoint_every_steps=1000))
  config.optim.update(dict(
      base_learning_rate=0.2,  # peak 0.1 at batch 128 (x batch / 256)
      warmup_epochs=1.0,       # a short warmup: 15 epochs in all
      weight_decay=5e-4,       # the usual CIFAR ResNet value
      label_smoothing=0.0))    # plain cross-entropy, as the CIFAR baselines
  return config

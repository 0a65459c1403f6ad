"""A small NF-ResNet trained from scratch on your own images.

  data_dir/train/<class>/*.jpg|*.png   data_dir/validation/<class>/...
  python train.py --config=configs/folder.py --workdir=runs/my_images \
      --config.data.data_dir=/path/to/data_dir --config.data.num_classes=N

data.num_classes and model.num_classes are one value: setting either sets
both. The layout, its checks and corrupt files: docs/own_data.md.
"""

import ml_collections

from configs import base


def get_config():
  config = base.get_base_config()
  num_classes = ml_collections.FieldReference(2)  # data and model share it
  config.model.update(dict(
      name='nf_resnet', depths=(1, 1, 1, 1), width=0.25, alpha=0.2,
      dropout_rate=0.0, stochastic_depth_rate=0.0))
  config.model.num_classes = num_classes
  config.data.update(dict(
      name='folder', data_dir='', image_size=64,
      augment=True))       # Inception crop + flip; eval: center crop 87.5%
  config.data.num_classes = num_classes
  config.train.update(dict(
      batch_size=64, eval_batch_size=100, epochs=30,
      log_every_steps=50, eval_every_steps=0, checkpoint_every_steps=500))
  config.optim.update(dict(
      # Peak 0.05 at batch 64, as configs/quickstart.py (unnormalized nets
      # diverge at twice that without adaptive gradient clipping).
      base_learning_rate=0.2, scale_by_batch_size=True, warmup_epochs=1.0,
      weight_decay=1e-4, label_smoothing=0.1))
  return config

"""Fine-tuning: the CIFAR-10 NF-ResNet, trained first, on the MNIST digits
with a new classifier (config.init_from).

  python train.py --config=configs/cifar10/nf_resnet.py --workdir=runs/c10_nf
  python train.py --config=configs/finetune.py --workdir=runs/finetune_mnist

Everything but the classifier starts from runs/c10_nf's newest checkpoint;
the optimizer and the step start fresh. The same config with
--config.init_from.path='' trains the same network from scratch for
comparison (docs/pretrained.md gives both results).
"""

from configs import quickstart
from configs.cifar10 import nf_resnet


def get_config():
  config = quickstart.get_config()
  config.model = nf_resnet.get_config().model  # the pretrained network
  config.init_from.update(dict(path='runs/c10_nf', new_classifier=True))
  config.train.update(dict(epochs=2, batch_size=64, log_every_steps=25,
                           checkpoint_every_steps=125))
  config.optim.update(dict(base_learning_rate=0.1, warmup_epochs=0.25))
  return config

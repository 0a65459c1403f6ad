"""Studies 2 (trainability with depth) and 3 (alpha) base: deeper quickstarts.

The quickstart network and data (width 0.25, 32 px MNIST digits, batch 64,
peak learning rate 0.05) with the block layout set per point by the sweep
(model.depths), trained for 2 epochs (warmup 0.25 epoch) so a 33-block
network still fits the study's time on 2 CPU cores. Short training also
keeps the digits from being learned perfectly by every method.
"""

from configs import quickstart


def get_config():
  config = quickstart.get_config()
  config.train.update(dict(epochs=2, log_every_steps=50,
                           checkpoint_every_steps=100))
  config.optim.warmup_epochs = 0.25
  return config

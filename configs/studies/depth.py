"""Studies 2 (trainability with depth) and 3 (alpha) base.

The batch-size study's recipe (quickstart network and data, 2 epochs, batch
64) with the block layout set per point by the sweep (model.depths). Deep
networks are slower per step, so they log and checkpoint more often.
"""

from configs.studies import batch_size


def get_config():
  config = batch_size.get_config()
  config.train.update(dict(log_every_steps=50, checkpoint_every_steps=100))
  return config

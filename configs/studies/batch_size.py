"""Study 1 base: the quickstart network and data, trained for 2 epochs.

The quickstart recipe (15 epochs) takes 30-60 s per run at batch 64 and 15x
more steps at batch 4; 2 epochs (warmup 0.25 epoch) keep the 18 runs of the
batch-size study near 15 minutes on 2 quiet CPU cores, and leave the digits
less than fully learned, so methods can differ. The learning rate scales
with the batch (optim.scale_by_batch_size) and the epoch count stays fixed
across batch sizes (equal epochs, not equal steps).
"""

from configs import quickstart


def get_config():
  config = quickstart.get_config()
  config.train.update(dict(epochs=2, log_every_steps=500,
                           checkpoint_every_steps=500))
  config.optim.warmup_epochs = 0.25
  return config

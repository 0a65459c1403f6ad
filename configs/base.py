"""The fields every training config has, with the ImageNet recipe as default.

Values and their sources (the paper's ImageNet experiments and the
reference code's ImageNet setup): batch 1024, 90 epochs, SGD + Nesterov
momentum 0.9, learning rate 0.1 x batch / 256, 5 warmup epochs then cosine
decay to 0, weight decay 1e-4 off gains/biases/scalars, label smoothing 0.1,
fp32.
"""

import ml_collections

from nfnets import resnet


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.compute_dtype = 'float32'  # or 'bfloat16' (params, loss stay f32)
  # Matmul/convolution precision of float32 compute: 'highest' is float32
  # on every backend; 'high' / 'default' allow TF32 on GPUs and fewer
  # bfloat16 passes on TPUs (faster). SPPs always use 'highest'.
  config.matmul_precision = 'highest'
  # Deterministic GPU kernels (XLA's --xla_gpu_deterministic_ops): a resumed
  # run equals an uninterrupted one on GPU too, at some speed cost. CPU runs
  # are deterministic without it.
  config.deterministic = False
  config.eval_split = 'validation'
  # Start a new run from trained weights: a weights file (*.safetensors,
  # e.g. converted timm weights) or another run's workdir (its newest
  # checkpoint). The optimizer and step start fresh; a classifier of
  # another num_classes is re-initialized (new_classifier: always, for a new
  # task with as many classes). use_ema: start from the source's EMA
  # parameters. Ignored when the workdir already has a checkpoint.
  config.init_from = ml_collections.ConfigDict()
  config.init_from.path = ''
  config.init_from.use_ema = False
  config.init_from.new_classifier = False

  config.model = resnet.default_config()

  config.data = ml_collections.ConfigDict()
  config.data.name = 'imagenet2012'   # one of nfnets.data.SOURCES
  config.data.data_dir = ''           # tfds data dir; '' = $TFDS_DATA_DIR
  config.data.image_size = 224        # train and eval resolution (paper)
  config.data.augment = True          # Inception crop + flip; eval center crop
  config.data.random_shift_px = 0     # random translation (small datasets)
  config.data.eval_crop_fraction = 0.875  # standard ResNet eval crop 224/256
  # Evaluation resolution; 0 = image_size (NF-RegNets test above train size).
  config.data.eval_image_size = 0
  config.data.num_classes = 1000
  # grain worker processes decoding JPEGs in each training process, for
  # training and evaluation. -1 = auto: the cores this process may use
  # (os.sched_getaffinity) divided by the training processes on this host
  # that share them, less one for the training loop, at least 1
  # (nfnets.data.resolve_num_workers); 0 = decode in the training process.
  # In-memory sources (mnist, cifar10, fake) never use workers.
  config.data.num_workers = -1
  config.data.fake_train_size = 1024  # only for name='fake'
  config.data.fake_eval_size = 256

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 1024      # global, over all devices (reference)
  config.train.eval_batch_size = 1000
  # Micro-batches per optimizer step: each device runs K forward/backward
  # passes on batch_size / (K x devices) examples and the gradients are
  # averaged (exact for NF nets; BatchNorm nets normalize by each
  # micro-batch). Steps, ETA and checkpoints count optimizer steps.
  config.train.accumulation_steps = 1
  # BatchNorm baselines: batch statistics averaged over all devices in each
  # layer (True), or each device's own examples only (False).
  config.train.bn_sync_devices = True
  config.train.epochs = 90            # reference NF-ResNet schedule
  # Total optimizer steps; 0 = epochs x (train examples // batch_size).
  config.train.steps = 0
  config.train.log_every_steps = 100
  config.train.eval_every_steps = 5000  # 0: only at the end
  config.train.checkpoint_every_steps = 1000
  config.train.keep_checkpoints = 3
  # MixUp + CutMix on the global batch (NF-RegNet recipe): half of the batch
  # MixUp with ratio ~ Beta(mixup_alpha, mixup_alpha), half CutMix.
  # mixup_alpha 0 and cutmix False = off.
  config.train.mixup_alpha = 0.0
  config.train.cutmix = False
  # Per-stage signal statistics of the current parameters on a fixed probe
  # batch every this many steps; 0 = off.
  config.train.signal_stats_every_steps = 0

  config.optim = ml_collections.ConfigDict()
  config.optim.base_learning_rate = 0.1  # per 256 examples (Goyal et al.)
  config.optim.scale_by_batch_size = True
  config.optim.warmup_epochs = 5.0
  # Cosine decay ends here (absolute, not scaled by batch); reference
  # NF-RegNets decay to a minimum (their configs set it), ResNets to 0.
  config.optim.end_learning_rate = 0.0
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 1e-4       # not on gains, biases, scalars
  config.optim.label_smoothing = 0.1
  # Adaptive gradient clipping threshold (NFNets paper: 0.01 at batch 4096);
  # 0 = off, the NF-ResNet recipe does not clip.
  config.optim.agc_clipping = 0.0
  # EMA of parameters, e.g. 0.99999 (reference NF-RegNets); None = off.
  config.optim.ema_decay = ml_collections.FieldReference(None, field_type=float)
  return config


# Dropout before the classifier and the final stochastic-depth rate per
# depth. The paper says NF-ResNets need both to match BN-ResNets but the
# reference code publishes no NF-ResNet values; stochastic depth 0.1 is the
# reference code's default rate, dropout grows with depth as our starting
# point for ablations, not a published number.
NF_REGULARIZATION = {
    'ResNet50': dict(dropout_rate=0.2, stochastic_depth_rate=0.1),
    'ResNet101': dict(dropout_rate=0.25, stochastic_depth_rate=0.1),
    'ResNet152': dict(dropout_rate=0.3, stochastic_depth_rate=0.1),
    'ResNet200': dict(dropout_rate=0.35, stochastic_depth_rate=0.1),
    'ResNet288': dict(dropout_rate=0.4, stochastic_depth_rate=0.1),
}


def nf_resnet_imagenet(variant: str) -> ml_collections.ConfigDict:
  """The ImageNet recipe for an NF-ResNet variant."""
  config = get_base_config()
  config.model.update(dict(
      name='nf_resnet', variant=variant,
      alpha=0.2,              # every reference config
      activation='relu',
      skip_gain_init=0.0,     # SkipInit-style zero init for training
      **NF_REGULARIZATION[variant]))
  return config


def baseline_imagenet(name: str, **model_overrides) -> ml_collections.ConfigDict:
  """The same recipe for a ResNet-50 baseline (no dropout/stochastic depth)."""
  config = get_base_config()
  config.model.update(dict(name=name, variant='ResNet50', **model_overrides))
  return config

"""Training and evaluation of any nfnets model, data-parallel on every device.

One per-device program (jax.shard_map over a 1-D 'data' mesh of all devices
of all processes), jitted: parameters and optimizer state replicated, the
batch sharded, gradients, BatchNorm statistics and metrics averaged over the
mesh with pmean. `train_and_evaluate(config, workdir)` is the whole job;
train.py and eval.py are thin command-line wrappers.

The loop keeps the devices busy: batches are prepared in a background thread
(or grain workers) and put on the devices two steps ahead, metrics are summed
on the devices and fetched only at log steps, and at most two steps are in
flight. A NaN/Inf loss is caught at the next log step or before the next
checkpoint or evaluation, whichever comes first, so a diverged state is never
saved.
"""

import collections
import copy
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nfnets import backend
from nfnets import checkpointing
from nfnets import counting
from nfnets.cpu import runtime as cpu_runtime
from nfnets import data
from nfnets import errors
from nfnets import metric_writer
from nfnets import mixing
from nfnets import models
from nfnets import ops
from nfnets import optim
from nfnets import paths
from nfnets import preemption
from nfnets import spp
from nfnets import weights as weights_lib
from nfnets import workdir as workdir_lib

AXIS = 'data'
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# jax.default_matmul_precision values: 'highest' keeps float32 matmuls and
# convolutions float32 on every backend (no TF32 on GPU, no bf16 passes on
# TPU); 'high' / 'default' trade that for speed.
MATMUL_PRECISIONS = ('highest', 'high', 'default')


TrainingDiverged = errors.TrainingDiverged
# Train metrics summed on the devices between log steps.
_SUMMED_METRICS = ('loss', 'top1', 'top5', 'grad_norm')
# Host batches prepared ahead by the background thread (num_workers == 0),
# and batches already on the devices ahead of the running step.
_HOST_PREFETCH = 2
_DEVICE_PREFETCH = 2
# Signal statistics during training: a fixed batch of N(0, 1) images, as in
# the paper's SPPs, so the numbers compare with the plots at init.
_PROBE_BATCH = 16
_PROBE_SEED = 1234


def validate_config(config, device_count: int | None = None) -> None:
  """Checks that need no data and no compute; raises UserError naming the
  value and what is allowed."""
  try:
    _validate_config(config, device_count or jax.device_count())
  except ValueError as e:
    raise errors.UserError(str(e)) from None


def _validate_config(config, device_count: int) -> None:
  models.validate_config(config.model)
  models.check_image_size(config.model, config.data.image_size)
  if config.data.name not in data.SOURCES:
    raise ValueError(f'Unknown dataset {config.data.name!r}; allowed: '
                     f'{data.SOURCES}.')
  if config.model.num_classes != config.data.num_classes:
    raise ValueError(
        f'model.num_classes={config.model.num_classes} but the dataset '
        f'{config.data.name} has data.num_classes={config.data.num_classes}.')
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f'Unknown compute_dtype {config.compute_dtype!r}; '
                     f'allowed: {tuple(COMPUTE_DTYPES)}.')
  if config.matmul_precision not in MATMUL_PRECISIONS:
    raise ValueError(f'Unknown matmul_precision {config.matmul_precision!r}; '
                     f'allowed: {MATMUL_PRECISIONS}.')
  init_path = config.init_from.path
  if init_path and not os.path.exists(init_path):
    raise ValueError(f'init_from.path={init_path!r} does not exist; give a '
                     'weights file (*.safetensors) or a training workdir.')
  for name in ('batch_size', 'eval_batch_size'):
    if config.train[name] < 1:
      raise ValueError(f'train.{name} must be >= 1, got {config.train[name]}.')
  if config.optim.ema_decay is not None and not 0 < config.optim.ema_decay < 1:
    raise ValueError(
        f'optim.ema_decay must be in (0, 1) or None, got {config.optim.ema_decay}.')
  for batch_name in ('batch_size', 'eval_batch_size'):
    if config.train[batch_name] % device_count:
      raise ValueError(
          f'train.{batch_name}={config.train[batch_name]} is not divisible '
          f'by the {device_count} devices; use a multiple of {device_count}.')
  accumulation = config.train.accumulation_steps
  if not isinstance(accumulation, int) or accumulation < 1:
    raise ValueError(f'train.accumulation_steps must be an integer >= 1, got '
                     f'{accumulation!r}.')
  if accumulation > 1 and config.train.batch_size % (accumulation
                                                      * device_count):
    raise ValueError(
        f'train.batch_size={config.train.batch_size} does not split into '
        f'train.accumulation_steps={accumulation} micro-batches on each of '
        f'the {device_count} devices; use a multiple of '
        f'{accumulation * device_count}.')
  for name in ('steps', 'log_every_steps', 'eval_every_steps',
               'signal_stats_every_steps'):
    if config.train[name] < 0:
      raise ValueError(f'train.{name} must be >= 0, got {config.train[name]}.')
  for name in ('checkpoint_every_steps', 'keep_checkpoints'):
    if config.train[name] < 1:
      raise ValueError(f'train.{name} must be >= 1, got {config.train[name]}.')
  if not config.train.steps and not config.train.epochs > 0:
    raise ValueError(f'train.epochs must be > 0 when train.steps is 0, got '
                     f'{config.train.epochs}.')
  if config.data.eval_image_size:
    models.check_image_size(config.model, config.data.eval_image_size)
  sizes = {config.data.image_size, config.data.eval_image_size
           or config.data.image_size}
  if config.model.get('stem', 'imagenet').startswith('cifar') and sizes != {32}:
    raise ValueError(
        f'model.stem={config.model.stem!r} is for 32 px images, but '
        f'data.image_size={config.data.image_size} (eval_image_size='
        f'{config.data.eval_image_size}); use image_size=32 or '
        "model.stem='imagenet'.")
  if config.data.get('random_shift_px', 0) < 0:
    raise ValueError(f'data.random_shift_px must be >= 0, got '
                     f'{config.data.random_shift_px}.')
  if config.data.name == 'cifar10':
    data.check_cifar10_config(config.data)
  if config.data.name == 'folder':
    data.check_folder_config(config.data, config.eval_split)
  data.check_num_workers(config.data)


DETERMINISTIC_XLA_FLAG = '--xla_gpu_deterministic_ops=true'


def use_deterministic_kernels(config) -> None:
  """When config.deterministic: XLA's deterministic-GPU-kernels flag in
  XLA_FLAGS and scatter-free max-pool gradients (nfnets/ops.py). Both are
  read once, when the backend starts and at the first traced call: the
  scripts call this before anything touches a device."""
  if not config.deterministic:
    return
  flags = os.environ.get('XLA_FLAGS', '')
  if DETERMINISTIC_XLA_FLAG not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {DETERMINISTIC_XLA_FLAG}'.strip()
  os.environ[ops.DETERMINISTIC_ENV_VAR] = '1'


class Experiment:
  """Model, optimizer and the jitted data-parallel train and eval steps.

  The train state is a dict of arrays: step (int32 []), params, bn_state,
  opt_state, ema_params (or {} without EMA), rng (uint32 key data).
  """

  def __init__(self, config, devices=None):
    devices = list(devices or jax.devices())
    validate_config(config, len(devices))
    self.config = config
    self.mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
    # One device: no sums or averages over devices in the train step (XLA
    # keeps even a one-device all-reduce, as a copy and a barrier).
    one_device = self.mesh.size == 1
    self._one_device = one_device
    # Only single-device computations run inline (on this thread), where
    # the host memory a CPU step frees can be kept for the next one.
    self._keep_host_memory = (cpu_runtime.computations_run_inline()
                              and one_device and jax.process_count() == 1)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(AXIS))
    self.compute_dtype = COMPUTE_DTYPES[config.compute_dtype]

    # Same parameters, two BatchNorm settings: statistics averaged over the
    # mesh axis inside the train step (unless on one device, or
    # train.bn_sync_devices is False: then each device normalizes by its own
    # examples' statistics); none outside the mesh (init) and in eval mode
    # (which uses the moving averages).
    local_config = copy.deepcopy(config.model)
    local_config.bn_axis_name = None
    self.model = models.build(local_config)
    mesh_config = copy.deepcopy(config.model)
    mesh_config.bn_axis_name = (
        AXIS if config.train.bn_sync_devices and not one_device else None)
    self.train_model = models.build(mesh_config)

    try:
      self.train_source = data.get_source(config.data, 'train')
    except (ValueError, OSError) as e:  # OSError: missing or unreadable
      raise errors.UserError(str(e)) from None
    batch = config.train.batch_size
    self.steps_per_epoch = max(1, len(self.train_source.records) // batch)
    self.total_steps = config.train.steps or int(
        round(config.train.epochs * self.steps_per_epoch))
    self.schedule = optim.learning_rate_schedule(
        config.optim, batch, self.total_steps, self.steps_per_epoch)
    self.optimizer = optim.make_optimizer(config.optim, self.schedule)

    # On one device the local gradient is the global one. With varying-axis
    # checks, shard_map's transpose still sums it over the one-device group
    # (a copy of every gradient and a barrier before the optimizer: 3-4% of
    # an NF-ResNet-50 CPU step). Without the checks it stays local; nothing
    # else in the step depends on them. Never without them on more devices:
    # each would then apply its own unsummed gradient (psum transposes to
    # psum) and the replicas would drift apart.
    self._per_device_train_step = jax.shard_map(
        self._train_step_per_device, mesh=self.mesh,
        in_specs=(P(), P(AXIS)), out_specs=(P(), P()),
        check_vma=not one_device)
    self._train_step = jax.jit(self._per_device_train_step,
                               donate_argnums=0)
    self._train_step_accumulate = jax.jit(self._train_and_accumulate,
                                          donate_argnums=(0, 2))
    # The same parameters without dropout / stochastic depth and with local
    # BatchNorm statistics, for deterministic signal statistics.
    probe_config = copy.deepcopy(config.model)
    probe_config.update(dict(bn_axis_name=None, dropout_rate=0.0,
                             stochastic_depth_rate=0.0))
    self._probe_model = models.build(probe_config)
    self.block_plan = models.block_plan(config.model)
    self._signal_statistics = jax.jit(self._signal_statistics_fn,
                                      out_shardings=self.replicated)
    self._eval_step = jax.jit(jax.shard_map(
        self._eval_step_per_device, mesh=self.mesh,
        in_specs=(P(), P(), P(AXIS)), out_specs=P()))
    self._mix_rng_seed = (config.seed, jax.process_index())

  def _normalize(self, images: jax.Array) -> jax.Array:
    """uint8 [N, H, W, 3] -> compute dtype, per-channel standardized."""
    mean = jnp.asarray(self.train_source.mean, jnp.float32)
    std = jnp.asarray(self.train_source.std, jnp.float32)
    return ((images.astype(jnp.float32) - mean) / std).astype(
        self.compute_dtype)

  def init_state(self) -> dict:
    """A fresh, replicated train state from config.seed."""
    size = self.config.data.image_size

    def init(rng):
      init_rng, train_rng = jax.random.split(rng)
      images = jnp.zeros((2, size, size, 3), self.compute_dtype)
      params, bn_state = self.model.init(init_rng, images, is_training=True)
      ema = params if self.config.optim.ema_decay else {}
      return dict(step=jnp.zeros((), jnp.int32), params=params,
                  bn_state=bn_state, opt_state=self.optimizer.init(params),
                  ema_params=ema, rng=jax.random.key_data(train_rng))

    return jax.jit(init, out_shardings=self.replicated)(
        jax.random.key(self.config.seed))

  def abstract_state(self) -> dict:
    """Shapes, dtypes and shardings of the train state, computing nothing."""
    shapes = jax.eval_shape(self.init_state)
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                       sharding=self.replicated), shapes)

  def other_layouts(self) -> list:
    """models.other_layouts of the model, converting back in one jitted
    program (restored arrays may span processes): for
    Checkpointer.restore."""
    return [(to_other, jax.jit(back, out_shardings=self.replicated))
            for to_other, back in models.other_layouts(self.config.model)]

  def shard_batch(self, local_batch: dict) -> dict:
    """Process-local numpy batch -> global arrays sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local_batch.items()}

  @property
  def mixing(self) -> bool:
    return bool(self.config.train.mixup_alpha or self.config.train.cutmix)

  def mix_parameters(self, step: int, local_batch_size: int) -> dict:
    """Host-drawn MixUp ratios and CutMix boxes for this process's part of
    the batch of `step` (mixing.draw_mix; {} when mixing is off): a function
    of (seed, step, process), so a resumed run draws the same."""
    if not self.mixing:
      return {}
    size = self.config.data.image_size
    rng = np.random.default_rng((*self._mix_rng_seed, step))
    devices = jax.local_device_count()
    return mixing.draw_mix(rng, local_batch_size // devices, devices, size,
                           size, self.config.train.mixup_alpha,
                           self.config.train.cutmix)

  def _loss_and_grads(self, params, bn_state, rng, images, targets):
    """Mean loss, logits, new BatchNorm state and gradients of one
    (micro-)batch on this device."""

    def loss_fn(params):
      logits, new_bn_state = self.train_model.apply(
          params, bn_state, rng, images, is_training=True)
      loss = optim.classification_loss(
          logits, targets, self.config.optim.label_smoothing).mean()
      return loss, (logits, new_bn_state)

    (loss, (logits, bn_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    return loss, logits, bn_state, grads

  def _train_step_per_device(self, state, batch):
    with jax.default_matmul_precision(self.config.matmul_precision):
      return self._train_step_body(state, batch)

  def _train_step_body(self, state, batch):
    config = self.config
    rng = jax.random.wrap_key_data(state['rng'])
    rng = jax.random.fold_in(jax.random.fold_in(rng, state['step']),
                             jax.lax.axis_index(AXIS))
    images = self._normalize(batch['images'])
    labels = batch['labels']
    targets = labels
    if 'mix_ratio' in batch:  # pairs within this device's examples
      images, targets = mixing.apply_mix(
          images, labels, config.model.num_classes, batch['mix_ratio'],
          batch['mix_box'])
    params = state['params']
    if not self._one_device:
      # Each device differentiates its own loss and the gradients are then
      # averaged explicitly, in float32 (the parameters' dtype). Left to
      # shard_map's transpose, the sum would be taken where the forward
      # uses each parameter, in the compute dtype (bfloat16).
      params = jax.lax.pcast(params, AXIS, to='varying')
    micro_batches = config.train.accumulation_steps
    if micro_batches == 1:
      loss, logits, bn_state, grads = self._loss_and_grads(
          params, state['bn_state'], rng, images, targets)
    else:
      # K micro-batches in sequence: gradients summed, BatchNorm state
      # carried from one to the next, a fresh key for each.
      def split(x):
        return x.reshape(micro_batches, -1, *x.shape[1:])

      def micro_step(carry, micro):
        grad_sum, bn_state = carry
        index, micro_images, micro_targets = micro
        loss, logits, bn_state, grads = self._loss_and_grads(
            params, bn_state, jax.random.fold_in(rng, index), micro_images,
            micro_targets)
        return (jax.tree.map(jnp.add, grad_sum, grads), bn_state), (loss,
                                                                    logits)

      zeros = jax.tree.map(jnp.zeros_like, params)
      (grads, bn_state), (losses, logits) = jax.lax.scan(
          micro_step, (zeros, state['bn_state']),
          (jnp.arange(micro_batches), split(images), split(targets)))
      grads = jax.tree.map(lambda g: g / micro_batches, grads)
      loss = losses.mean()
      logits = logits.reshape(-1, logits.shape[-1])
    if not self._one_device:
      grads = jax.lax.pmean(grads, AXIS)
      loss = jax.lax.pmean(loss, AXIS)
    updates, opt_state = self.optimizer.update(grads, state['opt_state'],
                                               state['params'])
    params = optax.apply_updates(state['params'], updates)
    ema_params = state['ema_params']
    if config.optim.ema_decay:
      ema_params = optax.incremental_update(params, ema_params,
                                            1 - config.optim.ema_decay)
    logits = logits.astype(jnp.float32)
    metrics = jax.lax.pmean(dict(
        top1=optim.topk_correct(logits, labels, 1).mean(),
        top5=optim.topk_correct(logits, labels, 5).mean()), AXIS)
    metrics['loss'] = loss
    metrics['learning_rate'] = self.schedule(state['step'])
    metrics['grad_norm'] = optax.tree.norm(grads)
    new_state = dict(step=state['step'] + 1, params=params,
                     bn_state=jax.lax.pmean(bn_state, AXIS),
                     opt_state=opt_state, ema_params=ema_params,
                     rng=state['rng'])
    return new_state, metrics

  def train_step(self, state: dict, local_batch: dict):
    """One optimizer step on a process-local batch; donates state."""
    if self.mixing:  # the step number is needed on the host
      local_batch = local_batch | self.mix_parameters(
          int(state['step']), len(local_batch['labels']))
    with jax.set_mesh(self.mesh):
      batch = self.shard_batch(local_batch)
      if self._keep_host_memory:
        return self._run_keeping_host_memory(self._train_step, state, batch)
      return self._train_step(state, batch)

  @staticmethod
  def _run_keeping_host_memory(step, *inputs):
    """step(*inputs), reusing host memory between steps (CPU,
    nfnets/cpu/runtime.py). Ready inputs let XLA run it on this thread,
    whose malloc arena keeps the memory; with pending ones it would defer
    the step to a worker thread."""
    cpu_runtime.keep_freed_memory()
    return step(*jax.block_until_ready(inputs))

  def new_accumulator(self) -> dict:
    """Device-side sums of train metrics between log steps, and the first
    step whose loss was not finite (-1: none)."""
    return jax.device_put(dict(
        sums={name: jnp.zeros((), jnp.float32) for name in _SUMMED_METRICS},
        count=jnp.zeros((), jnp.int32),
        first_nonfinite_step=jnp.full((), -1, jnp.int32),
        learning_rate=jnp.zeros((), jnp.float32)), self.replicated)

  def _train_and_accumulate(self, state, batch, accumulator):
    new_state, metrics = self._per_device_train_step(state, batch)
    finite = jnp.isfinite(metrics['loss'])
    first = accumulator['first_nonfinite_step']
    accumulator = dict(
        sums={name: accumulator['sums'][name] + metrics[name]
              for name in _SUMMED_METRICS},
        count=accumulator['count'] + 1,
        first_nonfinite_step=jnp.where((first < 0) & ~finite,
                                       new_state['step'], first),
        learning_rate=metrics['learning_rate'].astype(jnp.float32))
    # A fresh (not donated) output that is ready when this step is done.
    done = new_state['step'] + 0
    return new_state, accumulator, done

  def compile_loop_step(self, state, accumulator):
    """The loop's step, compiled ahead of time for these shapes:
    a callable (state, device batch, accumulator) -> (state, accumulator,
    done): the compiled program, or on one CPU device a wrapper that keeps
    host memory between steps (`train_step`)."""
    local = data.local_batch_size(self.config.train.batch_size)
    size = self.config.data.image_size
    local_batch = dict(images=np.zeros((local, size, size, 3), np.uint8),
                       labels=np.zeros((local,), np.int32))
    local_batch |= self.mix_parameters(0, local)
    batch = {name: jax.ShapeDtypeStruct(
        (local * jax.process_count(), *value.shape[1:]), value.dtype,
        sharding=self.batch_sharding) for name, value in local_batch.items()}
    with jax.set_mesh(self.mesh):
      compiled = self._train_step_accumulate.lower(state, batch,
                                                   accumulator).compile()
    if not self._keep_host_memory:
      return compiled
    return functools.partial(self._run_keeping_host_memory, compiled)

  def device_batches(self, iterator, first_step: int,
                     ahead: int = _DEVICE_PREFETCH):
    """Yields (device batch, data state after it) from a host iterator for
    steps first_step, first_step + 1, ..., keeping `ahead` batches on the
    devices beyond the one returned (with their mixing parameters)."""
    queued = collections.deque()
    step = first_step
    while True:
      while len(queued) <= ahead:
        batch = next(iterator)
        batch = batch | self.mix_parameters(step, len(batch['labels']))
        step += 1
        queued.append((self.shard_batch(batch), iterator.get_state()))
      yield queued.popleft()

  def _signal_statistics_fn(self, params, bn_state):
    size = self.config.data.image_size
    images = jax.random.normal(jax.random.key(_PROBE_SEED),
                               (_PROBE_BATCH, size, size, 3), self.compute_dtype)
    with jax.default_matmul_precision(spp.SPP_PRECISION):
      (_, stats), _ = self._probe_model.apply(params, bn_state, None, images,
                                              True, True)
    return stats

  def signal_statistics(self, state) -> dict:
    """Per-block statistics (squared_mean, variance [blocks + 1],
    residual_variance [blocks]; numpy) of the current parameters on a fixed
    batch of N(0, 1) images, BatchNorm in training mode."""
    with jax.set_mesh(self.mesh):
      stats = self._signal_statistics(state['params'], state['bn_state'])
    return jax.tree.map(np.asarray, stats)

  def initialize_from(self, state: dict, log=print) -> dict:
    """state with the parameters (and BatchNorm state) of
    config.init_from, a fresh optimizer and the EMA restarted from them;
    logs one line saying what was loaded and what was re-initialized."""
    init_from = self.config.init_from
    loaded = weights_lib.read(init_from.path, warn=log)
    weights_lib.check_same_network(loaded, self.config.model)
    source = loaded.params
    if init_from.use_ema:
      if loaded.ema_params is None:
        raise errors.UserError(
            f'init_from.use_ema is True but {loaded.source} has no EMA '
            'parameters; set --config.init_from.use_ema=False.')
      source = loaded.ema_params
    host = checkpointing.to_host(state)
    source = weights_lib.in_model_layout(source, self.config.model,
                                         host['params'])
    params, fresh = weights_lib.transplant(host['params'], source, 'params',
                                           init_from.new_classifier)
    bn_state, fresh_bn = weights_lib.transplant(
        host['bn_state'], loaded.bn_state, 'bn_state')
    state = dict(host, params=params, bn_state=bn_state,
                 opt_state=self.optimizer.init(params),
                 ema_params=params if self.config.optim.ema_decay else {})
    kept = sorted(set(fresh) | set(fresh_bn))
    log(f'Initialized from {loaded.source}'
        + (' (its EMA parameters)' if init_from.use_ema else '') + ': '
        f'{counting.count_params(params) / 1e6:.2f}M parameters loaded'
        + (f', re-initialized {", ".join(kept)}' if kept else
           ', nothing re-initialized')
        + '; optimizer and step start fresh.')
    return jax.device_put(state, self.replicated)

  def _eval_step_per_device(self, named_params, bn_state, batch):
    """Global sums of loss, top-1, top-5 and the example count for each
    parameter set in named_params ({prefix: params}), all on the same
    decoded batch."""
    with jax.default_matmul_precision(self.config.matmul_precision):
      images = self._normalize(batch['images'])
      mask = batch['mask'].astype(jnp.float32)
      labels = batch['labels']
      sums = {}
      for prefix, params in named_params.items():
        logits, _ = self.model.apply(params, bn_state, None, images,
                                     is_training=False)
        per_example = dict(
            loss=optim.classification_loss(logits, labels, 0.0),
            top1=optim.topk_correct(logits, labels, 1),
            top5=optim.topk_correct(logits, labels, 5))
        sums |= {prefix + name: jnp.sum(value * mask)
                 for name, value in per_example.items()}
      sums['count'] = jnp.sum(mask)
      return jax.lax.psum(sums, AXIS)

  def evaluate(self, named_params: dict, bn_state, split: str) -> dict:
    """Loss, top-1 and top-5 over every example of split (global sums
    divided by the global count), for each {prefix: params} of
    named_params, with names prefixed; each batch is decoded once."""
    totals = None
    with jax.set_mesh(self.mesh):
      for batch in data.eval_batches(self.config.data, split,
                                     self.config.train.eval_batch_size):
        sums = self._eval_step(named_params, bn_state,
                               self.shard_batch(batch))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals,
                                                          sums)
    totals = jax.tree.map(float, totals)
    count = totals.pop('count')
    if not count:  # every image undecodable (each one was named as skipped)
      return {k: float('nan') for k in totals} | {'examples': 0}
    return {k: v / count for k, v in totals.items()} | {'examples': count}

  def evaluate_state(self, state: dict, split: str) -> dict:
    """Metrics of the plain parameters and, with EMA, 'ema_'-prefixed ones
    (the EMA parameters run on the same decoded batches)."""
    named_params = {'': state['params']}
    if self.config.optim.ema_decay and state.get('ema_params'):
      named_params['ema_'] = state['ema_params']
    return self.evaluate(named_params, state['bn_state'], split)


def _format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return (f'{hours}:{rest // 60:02d}:{rest % 60:02d}' if hours
          else f'{rest // 60}:{rest % 60:02d}')


def format_metrics(metrics: dict, names=None) -> str:
  """'name=value ...' for names (default: all, sorted); counts as integers."""
  names = sorted(metrics) if names is None else names
  return ' '.join(
      f'{name}={int(metrics[name])}' if name == 'examples' else
      f'{name}={metrics[name]:.4f}' for name in names if name in metrics)


class _Progress:
  """Train-time bookkeeping: images/s and ETA count only train steps (not
  compilation, evaluation or checkpoints), data wait is the share of that
  time the loop spent waiting for the next batch."""

  def __init__(self, first_step: int, total_steps: int, batch_size: int):
    self.total_steps, self.batch_size = total_steps, batch_size
    self.first_step = first_step
    self.train_seconds = 0.0
    self.interval_seconds = self.interval_wait = 0.0
    self.interval_steps = 0

  def add(self, seconds: float, wait: float) -> None:
    self.train_seconds += seconds
    self.interval_seconds += seconds
    self.interval_wait += wait
    self.interval_steps += 1

  def interval_metrics(self) -> dict:
    seconds = max(self.interval_seconds, 1e-9)
    metrics = dict(
        images_per_second=self.interval_steps * self.batch_size / seconds,
        data_wait_fraction=min(1.0, self.interval_wait / seconds))
    self.interval_seconds = self.interval_wait = 0.0
    self.interval_steps = 0
    return metrics

  def line(self, step: int) -> str:
    done = step - self.first_step
    eta = (self.total_steps - step) * self.train_seconds / max(done, 1)
    return (f'step {step}/{self.total_steps} '
            f'({100 * step / self.total_steps:.0f}%)', f'ETA {_format_duration(eta)}')


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False,
                       log=print) -> dict:
  """Trains (resuming from the newest intact checkpoint in workdir) and
  evaluates; returns the final eval metrics.

  Everything a user can get wrong is checked before the workdir is touched;
  a workdir this call created is removed again if the run is refused
  before training starts. Raises errors.UserError subclasses for those,
  TrainingDiverged on a NaN/Inf loss (no checkpoint is written for it).
  """
  validate_config(config)
  is_main = jax.process_index() == 0
  created = paths.ensure_writable_dir(workdir, 'workdir')
  existing = set() if created else set(os.listdir(workdir))
  try:
    lock = workdir_lib.Lock(workdir).acquire() if is_main else None
  except BaseException:
    if created:
      workdir_lib.remove_if_unused(workdir)
    raise
  try:
    if lock and lock.previous_holder:
      log(f'Taking over {workdir}: the run that held it ended without '
          f'releasing it ({lock.previous_holder}).')
    stop = preemption.StopRequest(log).install()
    try:
      return _train(config, workdir, allow_config_change, log, stop)
    finally:
      stop.uninstall()
  except BaseException:
    if is_main:  # refused before writing anything of value
      if created:
        workdir_lib.remove_if_unused(workdir)
      else:
        workdir_lib.remove_new_if_unused(workdir, existing)
    raise
  finally:
    if lock:
      lock.release()


def _train(config, workdir, allow_config_change, log, stop) -> dict:
  experiment = Experiment(config)
  train = config.train
  total = experiment.total_steps
  checkpointer = checkpointing.Checkpointer(workdir, train.keep_checkpoints)
  config_dict = workdir_lib.config_to_dict(config)
  try:
    found = checkpointer.restore_latest_intact(
        experiment.abstract_state(), warn=log,
        other_layouts=experiment.other_layouts(), config_dict=config_dict)
  except BaseException:
    checkpointer.close()
    raise
  if found is None:
    step, state, data_state = 0, None, None
    if config.init_from.path:
      try:
        state = experiment.initialize_from(experiment.init_state(), log)
      except BaseException:
        checkpointer.close()
        raise
  else:
    step, state, data_state, recorded = found
    if recorded is None:  # checkpoints from before configs were stored
      recorded = _read_json(os.path.join(workdir, workdir_lib.CONFIG_FILE))
    try:
      workdir_lib.check_config(workdir, recorded, config_dict, step,
                               allow_config_change)
    except BaseException:
      checkpointer.close()
      raise
  if jax.process_index() == 0:
    workdir_lib.write_config(workdir, config_dict)
    names = data.class_names(config.data)
    if names is not None:
      workdir_lib.write_class_names(workdir, names)

  if step >= total:
    checkpointer.close()
    metrics = metric_writer.last_eval(workdir, step)
    if metrics is None:
      metrics = experiment.evaluate_state(state, config.eval_split)
    log(f'Already trained: {workdir} holds the final checkpoint (step '
        f'{step}/{total}). Final eval {config.eval_split}: '
        + format_metrics(metrics))
    return metrics

  if state is None:
    state = experiment.init_state()
  try:
    train_data, data_state, note = data.resume_data_config(config.data,
                                                           data_state)
  except BaseException:
    checkpointer.close()
    raise
  if note:
    log(note)
  params = counting.count_params(state['params'])
  pipeline = data.describe_pipeline(train_data, experiment.train_source)
  log(backend.describe())
  warning = backend.accelerator_warning()
  if warning:
    log(warning)
  micro = train.accumulation_steps
  log(f'Training {config.model.name} ({params / 1e6:.2f}M parameters) on '
      f'{jax.device_count()} {jax.devices()[0].platform.upper()} device(s) '
      f'in {jax.process_count()} process(es): global batch '
      f'{train.batch_size}'
      + (f' ({micro} micro-batches of {train.batch_size // micro})'
         if micro > 1 else '') + f', {total} steps '
      f'({total / experiment.steps_per_epoch:.1f} epochs), {pipeline}, '
      f'workdir {workdir}, '
      + (f'resuming from step {step}.' if step else
         'from the weights above.' if config.init_from.path else
         'from scratch.'))

  writer = metric_writer.MetricWriter(workdir, resume_step=step)
  iterator = data.train_iterator(train_data, train.batch_size, config.seed,
                                 experiment.train_source)
  if data.resolve_num_workers(train_data) == 0:  # else workers read ahead
    iterator = data.Prefetcher(iterator, _HOST_PREFETCH)
  if data_state is not None:
    iterator.set_state(data_state)
  eval_metrics = {}
  batches = None
  try:
    if stop.should_stop(is_log_step=True):  # a signal during the start
      raise stop.stopped(step, checkpoint_written=False)
    compile_start = time.time()
    accumulator = experiment.new_accumulator()
    step_fn = experiment.compile_loop_step(state, accumulator)
    log(f'Compiled the train step in {time.time() - compile_start:.1f} s.')
    progress = _Progress(step, total, train.batch_size)
    signal_every = train.signal_stats_every_steps
    latest_signal = None
    if signal_every and step % signal_every == 0:
      latest_signal = _log_signal_statistics(experiment, state, step, writer)
    batches = experiment.device_batches(iterator, step)
    previous_done = None

    def check_finite():
      bad_step = int(accumulator['first_nonfinite_step'])
      if bad_step >= 0:
        last_good = checkpointer.latest_step()
        raise TrainingDiverged(
            f'The loss became NaN or Inf at step {bad_step}; stopping. '
            + (f'The last good checkpoint is step {last_good}: lower '
               'optim.base_learning_rate or set optim.agc_clipping (e.g. '
               '0.01) and resume from it with --allow_config_change.'
               if last_good is not None else
               'No checkpoint was written yet: lower '
               'optim.base_learning_rate or set optim.agc_clipping (e.g. '
               '0.01) and rerun.'))

    while step < total:
      step_start = time.perf_counter()
      batch, batch_data_state = next(batches)
      wait = time.perf_counter() - step_start
      state, accumulator, done = step_fn(state, batch, accumulator)
      data_state = batch_data_state
      step += 1
      if previous_done is not None:  # at most two steps in flight
        previous_done.block_until_ready()
      previous_done = done
      last = step == total
      is_log_step = step % train.log_every_steps == 0 or last
      if is_log_step:  # this step's compute belongs to this interval
        done.block_until_ready()
      progress.add(time.perf_counter() - step_start, wait)

      if is_log_step:
        check_finite()
        host = jax.device_get(accumulator)
        count = max(int(host['count']), 1)
        metrics = {name: float(value) / count
                   for name, value in host['sums'].items()}
        metrics['learning_rate'] = float(host['learning_rate'])
        # Steps this row averages: fewer than log_every_steps in the first
        # row after a resume (and the last row of a run).
        metrics['steps'] = count
        metrics |= progress.interval_metrics()
        writer.write(step, 'train', metrics)
        where, eta = progress.line(step)
        covers = ('' if count == train.log_every_steps else
                  f' (mean of {count} steps)')
        log(f'{where} loss={metrics["loss"]:.4f} top1={metrics["top1"]:.4f}'
            f'{covers} {metrics["images_per_second"]:,.0f} img/s, data wait '
            f'{100 * metrics["data_wait_fraction"]:.0f}%, {eta}')
        accumulator = experiment.new_accumulator()
      if signal_every and step % signal_every == 0:
        check_finite()
        latest_signal = _log_signal_statistics(experiment, state, step,
                                               writer)
      if (train.eval_every_steps and step % train.eval_every_steps == 0
          ) or last:
        check_finite()
        eval_metrics = experiment.evaluate_state(state, config.eval_split)
        writer.write(step, 'eval', eval_metrics)
        if latest_signal is not None:
          _log_signal_plot(experiment, latest_signal, writer)
        log(f'eval {config.eval_split} at step {step}: '
            + format_metrics(eval_metrics))
      saving = step % train.checkpoint_every_steps == 0 or last
      stopping = not last and stop.should_stop(is_log_step)
      if saving or stopping:
        check_finite()
        checkpointer.save(step, state,
                          data.with_worker_count(data_state, train_data),
                          config_dict)
      if stopping:
        raise stop.stopped(step)
  finally:
    # Prefetcher's thread, or grain's worker processes and shared memory
    # (the batches queued for the devices hold some of it).
    # On CPU the device arrays may alias it too.
    batch = None  # pylint: disable=unused-variable
    if batches is not None:
      batches.close()
    data.close_iterator(iterator)
    checkpointer.close()
    writer.close()
  log(f'Done: {total} steps, {_format_duration(progress.train_seconds)} of '
      f'training. Final eval {config.eval_split}: '
      + format_metrics(eval_metrics))
  return eval_metrics


def _log_signal_statistics(experiment, state, step, writer):
  """Per-stage scalars to metrics.jsonl (kind 'signal') and TensorBoard;
  returns (step, per-block statistics) for the plot at the next eval."""
  stats = experiment.signal_statistics(state)
  writer.write(step, 'signal', spp.stage_statistics(stats,
                                                    experiment.block_plan))
  return step, stats


def _log_signal_plot(experiment, latest_signal, writer) -> None:
  """The SPP panels of the latest statistics as a TensorBoard image."""
  step, stats = latest_signal
  model = experiment.config.model
  alpha = model.alpha if model.name.startswith('nf_') else None
  result = spp.from_stats(f'step {step}', experiment.block_plan, stats, alpha)
  writer.write_image(step, 'signal/spp', spp.render(
      [result], title=f'{model.name} at step {step} (N(0, 1) probe batch)'))


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None

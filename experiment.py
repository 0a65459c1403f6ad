"""Training and evaluation of any nfnets model, data-parallel on every device.

One per-device program (jax.shard_map over a 1-D 'data' mesh of all devices
of all processes), jitted: parameters and optimizer state replicated, the
batch sharded, gradients, BatchNorm statistics and metrics averaged over the
mesh with pmean. `train_and_evaluate(config, workdir)` is the whole job;
train.py and eval.py are thin command-line wrappers.
"""

import copy
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nfnets import checkpointing
from nfnets import data
from nfnets import metric_writer
from nfnets import optim
from nfnets import paths
from nfnets import models

AXIS = 'data'
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class TrainingDiverged(RuntimeError):
  """The loss became NaN or Inf."""


def validate_config(config) -> None:
  """Checks that need no data and no compute; raises ValueError."""
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
  for name in ('batch_size', 'eval_batch_size'):
    if config.train[name] < 1:
      raise ValueError(f'train.{name} must be >= 1, got {config.train[name]}.')
  if config.optim.ema_decay is not None and not 0 < config.optim.ema_decay < 1:
    raise ValueError(
        f'optim.ema_decay must be in (0, 1) or None, got {config.optim.ema_decay}.')


class Experiment:
  """Model, optimizer and the jitted data-parallel train and eval steps.

  The train state is a dict of arrays: step (int32 []), params, bn_state,
  opt_state, ema_params (or {} without EMA), rng (uint32 key data).
  """

  def __init__(self, config, devices=None):
    validate_config(config)
    self.config = config
    devices = list(devices or jax.devices())
    for batch_name in ('batch_size', 'eval_batch_size'):
      if config.train[batch_name] % len(devices):
        raise ValueError(
            f'train.{batch_name}={config.train[batch_name]} is not divisible '
            f'by the {len(devices)} devices; use a multiple of {len(devices)}.')
    self.mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(AXIS))
    self.compute_dtype = COMPUTE_DTYPES[config.compute_dtype]

    # Same parameters, two BatchNorm settings: statistics averaged over the
    # mesh axis inside the train step; none outside the mesh (init) and in
    # eval mode (which uses the moving averages).
    local_config = copy.deepcopy(config.model)
    local_config.bn_axis_name = None
    self.model = models.build(local_config)
    mesh_config = copy.deepcopy(config.model)
    mesh_config.bn_axis_name = AXIS
    self.train_model = models.build(mesh_config)

    self.train_source = data.get_source(config.data, 'train')
    batch = config.train.batch_size
    self.steps_per_epoch = max(1, len(self.train_source.records) // batch)
    self.total_steps = config.train.steps or int(
        round(config.train.epochs * self.steps_per_epoch))
    self.schedule = optim.learning_rate_schedule(
        config.optim, batch, self.total_steps, self.steps_per_epoch)
    self.optimizer = optim.make_optimizer(config.optim, self.schedule)

    self._train_step = jax.jit(jax.shard_map(
        self._train_step_per_device, mesh=self.mesh,
        in_specs=(P(), P(AXIS)), out_specs=(P(), P())), donate_argnums=0)
    self._eval_step = jax.jit(jax.shard_map(
        self._eval_step_per_device, mesh=self.mesh,
        in_specs=(P(), P(), P(AXIS)), out_specs=P()))

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

  def shard_batch(self, local_batch: dict) -> dict:
    """Process-local numpy batch -> global arrays sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local_batch.items()}

  def _train_step_per_device(self, state, batch):
    config = self.config
    rng = jax.random.wrap_key_data(state['rng'])
    rng = jax.random.fold_in(jax.random.fold_in(rng, state['step']),
                             jax.lax.axis_index(AXIS))
    images = self._normalize(batch['images'])
    labels = batch['labels']

    def loss_fn(params):
      logits, bn_state = self.train_model.apply(
          params, state['bn_state'], rng, images, is_training=True)
      loss = optim.classification_loss(
          logits, labels, config.optim.label_smoothing).mean()
      # The global-batch mean. Differentiating it with respect to the
      # replicated parameters gives the global gradient, already summed over
      # the mesh by shard_map's transpose rules (no explicit pmean needed).
      return jax.lax.pmean(loss, AXIS), (logits, bn_state)

    (loss, (logits, bn_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state['params'])
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
    with jax.set_mesh(self.mesh):
      return self._train_step(state, self.shard_batch(local_batch))

  def _eval_step_per_device(self, params, bn_state, batch):
    logits, _ = self.model.apply(params, bn_state, None,
                                 self._normalize(batch['images']),
                                 is_training=False)
    mask = batch['mask'].astype(jnp.float32)
    labels = batch['labels']
    loss = optim.classification_loss(logits, labels, 0.0)
    sums = dict(loss=loss, top1=optim.topk_correct(logits, labels, 1),
                top5=optim.topk_correct(logits, labels, 5))
    sums = {k: jnp.sum(v * mask) for k, v in sums.items()}
    sums['count'] = jnp.sum(mask)
    return jax.lax.psum(sums, AXIS)

  def evaluate(self, params, bn_state, split: str) -> dict:
    """Loss, top-1 and top-5 over every example of split (global sums
    divided by the global count)."""
    totals = None
    with jax.set_mesh(self.mesh):
      for batch in data.eval_batches(self.config.data, split,
                                     self.config.train.eval_batch_size):
        sums = self._eval_step(params, bn_state, self.shard_batch(batch))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals,
                                                          sums)
    totals = jax.tree.map(float, totals)
    count = totals.pop('count')
    return {k: v / count for k, v in totals.items()} | {'examples': count}

  def evaluate_state(self, state: dict, split: str) -> dict:
    """Metrics of the plain parameters and, with EMA, 'ema_'-prefixed ones."""
    metrics = self.evaluate(state['params'], state['bn_state'], split)
    if self.config.optim.ema_decay:
      ema = self.evaluate(state['ema_params'], state['bn_state'], split)
      metrics |= {f'ema_{k}': v for k, v in ema.items() if k != 'examples'}
    return metrics


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in workdir) and evaluates.

  Returns the last eval metrics. Raises TrainingDiverged on a NaN/Inf loss,
  without writing a checkpoint for that step.
  """
  paths.ensure_writable_dir(workdir, 'workdir')
  experiment = Experiment(config)
  checkpointer = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints)
  writer = metric_writer.MetricWriter(workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=1))
  iterator = data.train_iterator(config.data, config.train.batch_size,
                                 config.seed, experiment.train_source)
  latest = checkpointer.latest_step()
  if latest is None:
    state = experiment.init_state()
  else:
    state, data_state = checkpointer.restore(latest,
                                             experiment.abstract_state())
    iterator.set_state(data_state)
    print(f'Resumed from {checkpointer.directory} at step {latest}.',
          flush=True)
  step = int(state['step'])
  total = experiment.total_steps
  train = config.train
  eval_metrics = {}
  interval_start, interval_steps = time.time(), 0
  try:
    while step < total:
      state, metrics = experiment.train_step(state, next(iterator))
      step += 1
      interval_steps += 1
      loss = float(metrics['loss'])
      if not math.isfinite(loss):
        raise TrainingDiverged(
            f'Loss is {loss} at step {step}; stopping. The latest checkpoint '
            f'(step {checkpointer.latest_step()}) is the last good one.')
      last = step == total
      if step % train.log_every_steps == 0 or last:
        elapsed = time.time() - interval_start
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics['images_per_second'] = (
            interval_steps * train.batch_size / max(elapsed, 1e-9))
        writer.write(step, 'train', metrics)
        interval_steps = 0
      if (train.eval_every_steps and step % train.eval_every_steps == 0) or last:
        eval_metrics = experiment.evaluate_state(state, config.eval_split)
        writer.write(step, 'eval', eval_metrics)
      if step % train.checkpoint_every_steps == 0 or last:
        checkpointer.save(step, state, iterator.get_state())
      if interval_steps == 0:  # images/s counts train steps only
        interval_start = time.time()
  finally:
    checkpointer.close()
    writer.close()
  return eval_metrics

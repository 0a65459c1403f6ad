"""Signal Propagation Plots (paper, Section 2): statistics, CSV, plot, summary.

For a model at initialization fed i.i.d. N(0, 1) images (NHWC), record after
the stem and after every residual block (post-addition) the average channel
squared mean and the average channel variance, and for every residual branch
the average channel variance of its output (before skip gain / alpha).

`measure` works for any model config of nfnets.resnet, e.g. from a notebook:

  from nfnets import resnet, spp
  result = spp.measure('nf', resnet.make_config(skip_gain_init=1.0), 224, 4)
  spp.plot([result], 'spp.png')
"""

import csv
import dataclasses
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nfnets import paths
from nfnets import models
from nfnets import resnet

# Deeper than this, run the forward pass op by op instead of under jax.jit:
# XLA compile time grows with the unrolled depth (about 3 minutes for a
# ResNet-600 on 2 CPU cores), while op-by-op execution compiles each distinct
# op shape once and every block of a stage repeats the same shapes.
_MAX_JIT_BLOCKS = 32
# Parameters do not depend on the image size: initialize on small images.
_INIT_IMAGE_SIZE = 32

CSV_FIELDS = ('model', 'block', 'stage', 'is_stage_end', 'squared_mean',
              'variance', 'residual_variance', 'expected_variance')


@dataclasses.dataclass(frozen=True)
class SignalPropagation:
  """Per-block statistics of one model; entry 0 of the first two is the stem."""
  label: str
  plan: tuple[resnet.BlockSpec, ...]
  squared_mean: np.ndarray       # [num_blocks + 1]
  variance: np.ndarray           # [num_blocks + 1]
  residual_variance: np.ndarray  # [num_blocks]
  expected_variance: np.ndarray  # [num_blocks + 1], nf_resnet's analytic beta^2
  seconds: float


def check_inputs(model_config, image_size: int, batch_size: int) -> None:
  """Raises ValueError for anything that would make the measurement fail."""
  models.validate_config(model_config)
  models.check_image_size(model_config, image_size)
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  if model_config.name == 'bn_resnet' and batch_size < 2:
    raise ValueError(
        f'batch_size={batch_size} with BatchNorm: the batch statistics of a '
        'single image are not those of the network; use batch_size >= 2.')


def expected_variances(plan: Sequence[resnet.BlockSpec], alpha: float):
  """Analytic variance after the stem (1) and after every block."""
  after_blocks = [(1.0 if spec.is_transition else spec.expected_std**2)
                  + alpha**2 for spec in plan]
  return np.array([1.0] + after_blocks)


def measure(label: str, model_config, image_size: int, batch_size: int,
            seed: int = 0) -> SignalPropagation:
  """Signal statistics of one model at init on N(0, 1) images.

  Args:
    label: the name of this model in tables, CSV and legends.
    model_config: a config of nfnets.resnet (use skip_gain_init=1 for NF and
      SkipInit models, so their branches contribute).
    image_size: height and width of the input, px.
    batch_size: images per forward pass; BatchNorm models use the batch
      statistics (training mode), so they need at least 2.
    seed: the same seed gives the same parameters, inputs and numbers.
  """
  check_inputs(model_config, image_size, batch_size)
  start = time.time()
  model = models.build(model_config)
  init_rng, data_rng = jax.random.split(jax.random.key(seed))
  images = jax.random.normal(data_rng, (batch_size, image_size, image_size, 3))
  plan = tuple(models.block_plan(model_config))

  def statistics(params, state, images):
    (_, stats), _ = model.apply(params, state, None, images, True, True)
    return stats

  if len(plan) <= _MAX_JIT_BLOCKS:
    init = jax.jit(model.init, static_argnums=2)
    statistics = jax.jit(statistics)
  else:
    init = model.init
  init_images = jnp.zeros((2, _INIT_IMAGE_SIZE, _INIT_IMAGE_SIZE, 3))
  params, state = init(init_rng, init_images, True)
  stats = jax.tree.map(np.asarray, statistics(params, state, images))
  return SignalPropagation(
      label=label, plan=plan, squared_mean=stats['squared_mean'],
      variance=stats['variance'],
      residual_variance=stats['residual_variance'],
      expected_variance=expected_variances(plan, model_config.alpha),
      seconds=time.time() - start)


def write_csv(results: Sequence[SignalPropagation], path: str) -> None:
  """One row per model and block; block 0 is the stem output."""
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, CSV_FIELDS)
    writer.writeheader()
    for result in results:
      for block in range(len(result.plan) + 1):
        spec = result.plan[block - 1] if block else None
        writer.writerow(dict(
            model=result.label, block=block,
            stage=spec.stage + 1 if spec else 0,
            is_stage_end=int(bool(spec and spec.is_stage_end)),
            squared_mean=f'{result.squared_mean[block]:.6g}',
            variance=f'{result.variance[block]:.6g}',
            residual_variance=(
                f'{result.residual_variance[block - 1]:.6g}' if spec else ''),
            expected_variance=f'{result.expected_variance[block]:.6g}'))


def summary_table(results: Sequence[SignalPropagation]) -> str:
  """Per model and stage: max squared mean, max variance, mean residual var."""
  lines = [f'{"model":<22} {"stage":>5} {"blocks":>6} {"max sq. mean":>13} '
           f'{"max variance":>13} {"mean res. var":>13}']
  for result in results:
    stages = np.array([spec.stage for spec in result.plan])
    for stage in range(stages.max() + 1):
      in_stage = np.flatnonzero(stages == stage)
      lines.append(
          f'{result.label:<22} {stage + 1:>5} {len(in_stage):>6} '
          f'{result.squared_mean[in_stage + 1].max():>13.4g} '
          f'{result.variance[in_stage + 1].max():>13.4g} '
          f'{result.residual_variance[in_stage].mean():>13.4g}')
  return '\n'.join(lines)


def plot(results: Sequence[SignalPropagation], path: str,
         title: str = '') -> None:
  """Three panels against block depth, one line per model, stage ends dotted."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  panels = (('Average channel squared mean', 'squared_mean', 0),
            ('Average channel variance', 'variance', 0),
            ('Residual average channel variance', 'residual_variance', 1))
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for ax, (ylabel, field, first_depth) in zip(axes, panels):
    for result in results:
      values = getattr(result, field)
      depth = np.arange(first_depth, first_depth + len(values))
      ax.plot(depth, values, label=result.label, linewidth=1.5)
      ends = [spec.index + 1 for spec in result.plan if spec.is_stage_end]
      ax.plot(ends, values[np.array(ends) - first_depth], 'o', color='black',
              markersize=4)
    ax.set_xlabel('Depth (residual block)')
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  axes[0].legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(model_configs: dict, image_size: int, batch_size: int, seed: int,
        output_dir: str, title: str = '',
        log: Callable[[str], None] = print) -> list[SignalPropagation]:
  """Measures every model, then writes spp.png and spp.csv into output_dir.

  Every input is checked before the first model runs.
  """
  if not model_configs:
    raise ValueError('No models to measure: the models field is empty.')
  for model_config in model_configs.values():
    check_inputs(model_config, image_size, batch_size)
  paths.ensure_writable_dir(output_dir, 'output folder')
  results = []
  for i, (label, model_config) in enumerate(model_configs.items()):
    log(f'[{i + 1}/{len(model_configs)}] {label}: {model_config.name} '
        f'{model_config.get("variant", "") if not model_config.get("depths") else model_config.depths}'
        f', {len(models.block_plan(model_config))} blocks, '
        f'{batch_size}x{image_size}x{image_size} N(0,1) images ...')
    result = measure(label, model_config, image_size, batch_size, seed)
    log(f'[{i + 1}/{len(model_configs)}] {label}: done in {result.seconds:.1f} s')
    results.append(result)
  write_csv(results, os.path.join(output_dir, 'spp.csv'))
  plot(results, os.path.join(output_dir, 'spp.png'), title)
  return results

"""Signal Propagation Plots (paper, Section 2): statistics, CSV, plot, summary.

For a model at initialization fed i.i.d. N(0, 1) images (NHWC), record after
the stem and after every residual block (post-addition) the average channel
squared mean and the average channel variance, and for every residual branch
the average channel variance of its output (before skip gain / alpha); the
statistics dict is described in nfnets.signal_stats.

Models of the codebase (any family of nfnets.models), from a notebook:

  from nfnets import resnet, spp
  result = spp.measure('nf', resnet.make_config(skip_gain_init=1.0), 224, 4)
  spp.plot([result], 'spp.png')

Any other Haiku model: `measure_function` takes a forward function that
returns the statistics dict (build it with signal_stats.SignalRecorder).
During training, `stage_statistics` turns a model's statistics into scalars
per stage and `from_stats` + `render` draw the panels as an image.
"""

import csv
import copy
import dataclasses
import math
import os
import time
from typing import Callable, Mapping, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets import models
from nfnets import paths
from nfnets import stacking
from nfnets.signal_stats import SignalRecorder  # re-exported for users
from nfnets.signal_stats import STAT_KEYS

# Deeper than this, a model that cannot scan its blocks (no
# model.block_loop) runs op by op instead of under jax.jit: XLA compile time
# grows with the unrolled depth. Models with block_loop 'auto' are measured
# scanned and jitted.
_MAX_JIT_BLOCKS = stacking.AUTO_SCAN_MAX_UNROLLED_BLOCKS
# Parameters do not depend on the image size: initialize on small images.
_INIT_IMAGE_SIZE = 32
# Full float32 matmuls and convolutions on every backend (no TF32 on GPU, no
# bfloat16 passes on TPU): SPP numbers compare across machines.
SPP_PRECISION = 'highest'

CSV_FIELDS = ('model', 'block', 'stage', 'is_stage_end', 'squared_mean',
              'variance', 'residual_variance', 'expected_variance')
# The fields of an SPP preset (configs/spp/*.py); 'title' and 'log_scale'
# (bool, logarithmic y axes) are optional.
PRESET_FIELDS = ('image_size', 'batch_size', 'seed', 'output_dir', 'models')


@dataclasses.dataclass(frozen=True)
class Block:
  """Layout of one residual block, the fields SPPs use.

  models.block_plan(config) returns records with (at least) these fields;
  plan_from_depths builds them for any other model.
  """
  index: int            # 0-based over the whole network
  stage: int            # 0-based
  is_transition: bool   # its shortcut is a conv (stride or channel change)
  is_stage_end: bool
  expected_std: float = math.nan  # analytic std of the block input (NF)


@dataclasses.dataclass(frozen=True)
class SignalPropagation:
  """Per-block statistics of one model; entry 0 of the first two is the stem."""
  label: str
  plan: tuple  # of Block-like records, one per residual block
  squared_mean: np.ndarray       # [num_blocks + 1]
  variance: np.ndarray           # [num_blocks + 1]
  residual_variance: np.ndarray  # [num_blocks]
  expected_variance: np.ndarray  # [num_blocks + 1]; NaN where unknown
  seconds: float


def plan_from_depths(depths: Sequence[int]) -> tuple[Block, ...]:
  """Blocks of a network with depths[s] blocks in stage s; the first block of
  every stage is a transition. Expected stds are unknown (NaN)."""
  if not depths or any(int(d) != d or d < 1 for d in depths):
    raise ValueError(f'stage depths must be positive integers, got {depths}.')
  plan = []
  for stage, depth in enumerate(depths):
    for i in range(depth):
      plan.append(Block(index=len(plan), stage=stage, is_transition=i == 0,
                        is_stage_end=i == depth - 1))
  return tuple(plan)


def _check_size(image_size, batch_size) -> None:
  for name, value in (('image_size', image_size), ('batch_size', batch_size)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'{name} must be an integer >= 1, got {value!r}.')


def check_inputs(model_config, image_size: int, batch_size: int) -> None:
  """Raises ValueError for anything that would make the measurement fail:
  an unknown model name (the allowed ones are named), a bad model option
  (e.g. an unknown activation), an image below the network's stride."""
  _check_size(image_size, batch_size)
  models.validate_config(model_config)
  models.check_image_size(model_config, image_size)
  if model_config.name == 'bn_resnet' and batch_size < 2:
    raise ValueError(
        f'batch_size={batch_size} with BatchNorm: the batch statistics of a '
        'single image are not those of the network; use batch_size >= 2.')


def check_all(model_configs: Mapping, image_size: int, batch_size: int) -> None:
  """check_inputs for every model; the label of a bad one is in the error."""
  if not model_configs:
    raise ValueError('No models to measure: the models field is empty.')
  for label, model_config in model_configs.items():
    try:
      check_inputs(model_config, image_size, batch_size)
    except ValueError as e:
      raise ValueError(f'SPP model {label!r}: {e}') from e


def check_preset(config) -> None:
  """Validates a whole SPP preset (configs/spp/*.py) without running it."""
  missing = [f for f in PRESET_FIELDS if f not in config]
  if missing:
    raise ValueError(f'SPP preset lacks fields {missing}; an SPP preset has '
                     f'{PRESET_FIELDS} (and optionally title).')
  check_all(dict(config.models.items()), config.image_size, config.batch_size)


def expected_variances(plan: Sequence, alpha: float | None) -> np.ndarray:
  """Analytic variance after the stem (1) and after every block: each block
  adds alpha^2 to its input's expected variance, which is reset to 1 by a
  transition. [num_blocks + 1]; NaN without alpha or expected stds."""
  if alpha is None:
    return np.full(len(plan) + 1, np.nan)
  after_blocks = [(1.0 if spec.is_transition else spec.expected_std**2)
                  + alpha**2 for spec in plan]
  return np.array([1.0] + after_blocks)


def from_stats(label: str, plan: Sequence, stats: Mapping,
               alpha: float | None = None,
               seconds: float = 0.0) -> SignalPropagation:
  """A SignalPropagation from a model's statistics dict (numpy or jax arrays,
  shapes as in nfnets.signal_stats) and its block plan, e.g. to `render` the
  panels during training. alpha: NF models' alpha for the expected
  variance (None: unknown)."""
  plan = tuple(plan)
  _check_stat_shapes({k: np.shape(v) for k, v in stats.items()}, len(plan))
  stats = {key: np.asarray(stats[key], np.float64) for key in STAT_KEYS}
  return SignalPropagation(
      label=label, plan=plan, squared_mean=stats['squared_mean'],
      variance=stats['variance'],
      residual_variance=stats['residual_variance'],
      expected_variance=expected_variances(plan, alpha), seconds=seconds)


def _check_stat_shapes(shapes: Mapping, num_blocks: int | None) -> int:
  """Raises ValueError unless shapes are those of the statistics dict;
  returns the number of blocks."""
  missing = [k for k in STAT_KEYS if k not in shapes]
  if missing:
    raise ValueError(f'The statistics dict lacks {missing}; it must have '
                     f'{STAT_KEYS} (see nfnets.signal_stats).')
  if num_blocks is None:  # take it from residual_variance [num_blocks]
    residual_shape = tuple(shapes['residual_variance'])
    num_blocks = residual_shape[0] if len(residual_shape) == 1 else 0
  want = dict(squared_mean=(num_blocks + 1,), variance=(num_blocks + 1,),
              residual_variance=(num_blocks,))
  got = {k: tuple(shapes[k]) for k in STAT_KEYS}
  if num_blocks < 1 or got != want:
    raise ValueError(f'Statistics shapes {got} do not fit a network of '
                     f'residual blocks: want {want} (stem first).')
  return num_blocks


def stage_statistics(stats: Mapping, plan: Sequence) -> dict[str, float]:
  """Flat per-stage scalars of a statistics dict, for logging in training.

  Args:
    stats: the dict a model returns with return_stats=True (numpy or jax
      arrays): squared_mean, variance [num_blocks + 1] (stem first),
      residual_variance [num_blocks].
    plan: models.block_plan(config) (records with stage, is_stage_end).

  Returns:
    For every stage s = 1, 2, ...:
      'stage{s}/squared_mean', 'stage{s}/variance': the average channel
        squared mean and variance at the stage's last block output (where
        both peak within a stage at init, and where mean shift shows first);
      'stage{s}/residual_variance': the mean over the stage's blocks of the
        residual branches' average channel variance (1 for a
        variance-preserving branch).
  """
  result = from_stats('', plan, stats)
  scalars = {}
  stages = np.array([spec.stage for spec in result.plan])
  for stage in np.unique(stages):
    in_stage = np.flatnonzero(stages == stage)
    end = in_stage[-1] + 1  # entry 0 is the stem
    prefix = f'stage{stage + 1}'
    scalars[f'{prefix}/squared_mean'] = float(result.squared_mean[end])
    scalars[f'{prefix}/variance'] = float(result.variance[end])
    scalars[f'{prefix}/residual_variance'] = float(
        result.residual_variance[in_stage].mean())
  return scalars


def _random_images(seed: int, image_size: int, batch_size: int):
  """(init rng, N(0, 1) images [batch, size, size, 3]) of one seed."""
  init_rng, data_rng = jax.random.split(jax.random.key(seed))
  return init_rng, jax.random.normal(
      data_rng, (batch_size, image_size, image_size, 3))


def measure(label: str, model_config, image_size: int, batch_size: int,
            seed: int = 0) -> SignalPropagation:
  """Signal statistics of one model of the codebase at init on N(0, 1) images.

  Args:
    label: the name of this model in tables, CSV and legends.
    model_config: a config of any family in nfnets.models (use
      skip_gain_init=1 for NF and SkipInit models, so their branches
      contribute).
    image_size: height and width of the input, px.
    batch_size: images per forward pass; BatchNorm models use the batch
      statistics (training mode), so they need at least 2.
    seed: the same seed gives the same parameters, inputs and numbers.
  """
  check_inputs(model_config, image_size, batch_size)
  start = time.time()
  plan = tuple(models.block_plan(model_config))
  # Deep ResNets: scanned blocks, so jit compiles each stage's block once.
  scannable = model_config.get('block_loop') in ('auto', 'scan')
  if (model_config.get('block_loop') == 'auto'
      and stacking.scans('auto', len(plan), forward_only=True)):
    model_config = copy.deepcopy(model_config)
    model_config.block_loop = 'scan'
  model = models.build(model_config)
  init_rng, images = _random_images(seed, image_size, batch_size)

  def statistics(params, state, images):
    (_, stats), _ = model.apply(params, state, None, images, True, True)
    return stats

  if scannable or len(plan) <= _MAX_JIT_BLOCKS:
    init = jax.jit(model.init, static_argnums=2)
    statistics = jax.jit(statistics)
  else:
    init = model.init
  init_images = jnp.zeros((2, _INIT_IMAGE_SIZE, _INIT_IMAGE_SIZE, 3))
  with jax.default_matmul_precision(SPP_PRECISION):
    params, state = init(init_rng, init_images, True)
    # Dispatch is asynchronous: wait, so `seconds` includes the compute.
    stats = jax.block_until_ready(statistics(params, state, images))
  return from_stats(label, plan, stats, model_config.get('alpha'),
                    seconds=time.time() - start)


def measure_function(label: str, forward: Callable[[jax.Array], Mapping],
                     image_size: int, batch_size: int, *,
                     stage_depths: Sequence[int] | None = None,
                     seed: int = 0, jit: bool = True,
                     init_image_size: int | None = None) -> SignalPropagation:
  """Signal statistics of any Haiku model at init on N(0, 1) images.

  Args:
    label: the name of this model in tables, CSV and legends.
    forward: images [N, H, W, 3] -> the statistics dict of
      nfnets.signal_stats (squared_mean and variance [num_blocks + 1], stem
      first; residual_variance [num_blocks]), e.g. from a SignalRecorder.
      It is wrapped with hk.transform_with_state and called once to
      initialize and once to measure; it may use Haiku state (e.g.
      BatchNorm statistics) and hk.next_rng_key().
    image_size: height and width of the input, px.
    batch_size: images per forward pass.
    stage_depths: blocks per stage, for stage ends in plots and the summary
      (their sum must be num_blocks); None: one stage.
    seed: the same seed gives the same parameters, inputs and numbers.
    jit: compile the forward pass (fast for shallow models; very deep ones
      compile for minutes, set False to run op by op).
    init_image_size: initialize on zero images of this size (cheaper for
      big models whose parameters do not depend on the size); None: on the
      measured images.

  The output shapes are checked (by abstract evaluation) before anything
  is computed.
  """
  _check_size(image_size, batch_size)
  if init_image_size is not None:
    _check_size(init_image_size, batch_size)
  if stage_depths is not None:
    plan = plan_from_depths(stage_depths)
  start = time.time()
  model = hk.transform_with_state(forward)
  init_rng, images = _random_images(seed, image_size, batch_size)
  apply_rng = jax.random.fold_in(init_rng, 1)
  init, apply = model.init, model.apply
  if jit:
    init, apply = jax.jit(init), jax.jit(apply)
  init_images = images if init_image_size is None else jnp.zeros(
      (batch_size, init_image_size, init_image_size, 3))
  params_shape, state_shape = jax.eval_shape(init, init_rng, init_images)
  stats_shape, _ = jax.eval_shape(apply, params_shape, state_shape,
                                  apply_rng, images)
  if not isinstance(stats_shape, Mapping):
    raise ValueError(f'forward must return the statistics dict with keys '
                     f'{STAT_KEYS}; it returned {type(stats_shape).__name__}.')
  num_blocks = _check_stat_shapes(
      {k: v.shape for k, v in stats_shape.items()},
      len(plan) if stage_depths is not None else None)
  if stage_depths is None:
    plan = plan_from_depths([num_blocks])
  with jax.default_matmul_precision(SPP_PRECISION):
    params, state = init(init_rng, init_images)
    stats, _ = jax.block_until_ready(apply(params, state, apply_rng, images))
  return from_stats(label, plan, stats, seconds=time.time() - start)


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
  width = max([22] + [len(r.label) for r in results])
  lines = [f'{"model":<{width}} {"stage":>5} {"blocks":>6} '
           f'{"max sq. mean":>13} {"max variance":>13} {"mean res. var":>13}']
  for result in results:
    stages = np.array([spec.stage for spec in result.plan])
    for stage in np.unique(stages):
      in_stage = np.flatnonzero(stages == stage)
      lines.append(
          f'{result.label:<{width}} {stage + 1:>5} {len(in_stage):>6} '
          f'{result.squared_mean[in_stage + 1].max():>13.4g} '
          f'{result.variance[in_stage + 1].max():>13.4g} '
          f'{result.residual_variance[in_stage].mean():>13.4g}')
  return '\n'.join(lines)


def _figure(results: Sequence[SignalPropagation], title: str,
            log_scale: bool):
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
    if log_scale:
      ax.set_yscale('log')
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize='small')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig, plt


def plot(results: Sequence[SignalPropagation], path: str,
         title: str = '', log_scale: bool = False) -> None:
  """Writes the three SPP panels as a PNG file (log_scale: log y axes)."""
  fig, plt = _figure(results, title, log_scale)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def render(results: Sequence[SignalPropagation], title: str = '',
           log_scale: bool = False) -> np.ndarray:
  """The three SPP panels as an image, uint8 [H, W, 3] RGB (for TensorBoard)."""
  fig, plt = _figure(results, title, log_scale)
  fig.set_dpi(80)
  fig.canvas.draw()
  image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return image


def run(model_configs: Mapping, image_size: int, batch_size: int, seed: int,
        output_dir: str, title: str = '', log_scale: bool = False,
        log: Callable[[str], None] = print) -> list[SignalPropagation]:
  """Measures every model, then writes spp.png and spp.csv into output_dir.

  Every input is checked before the first model runs.
  """
  check_all(model_configs, image_size, batch_size)
  paths.ensure_writable_dir(output_dir, 'output folder')
  results = []
  for i, (label, model_config) in enumerate(model_configs.items()):
    log(f'[{i + 1}/{len(model_configs)}] {label}: {model_config.name}, '
        f'{len(models.block_plan(model_config))} blocks, '
        f'{batch_size}x{image_size}x{image_size} N(0,1) images ...')
    result = measure(label, model_config, image_size, batch_size, seed)
    log(f'[{i + 1}/{len(model_configs)}] {label}: done in '
        f'{result.seconds:.1f} s')
    results.append(result)
  write_csv(results, os.path.join(output_dir, 'spp.csv'))
  plot(results, os.path.join(output_dir, 'spp.png'), title, log_scale)
  return results

"""One accelerator benchmark run, reported as one table: train images/s of
NF-ResNet-50, BN-ResNet-50 (both BatchNorm orderings) and NF-RegNet-B0..B5
in float32 and bfloat16, the training loop against its step, and
evaluation images/s on JPEGs.

Runs on any machine with the project's requirements and a JAX for its
accelerator, from the repository root (docs/accelerators.md):

  pip install -r requirements-cuda12.txt         # NVIDIA GPUs
  python -m benchmarks.gpu                       # -> runs/gpu-<UTC time>/
  python -m benchmarks.gpu --outdir=DIR --budget_s=480

It prints the backend line (nfnets.backend.describe) first and refuses to
run when JAX runs on the CPU unless --allow_cpu is given. Cases, in order
of importance, each printed as soon as it is measured and written to
--outdir (gpu.json, gpu.md) after every case, so a run cut short keeps what
it measured; gpu.md, the table, is printed at the end:

  1. matmul: one large bf16 matrix product (the practical ceiling).
  2. Train step of nf_resnet50 and bn_resnet50 (both BatchNorm orderings) in
     each --dtypes, on a random uint8 batch put on the devices once (the
     experiment's own compiled loop step: SGD + Nesterov, weight decay,
     label smoothing, EMA as configured), so the rate is the devices' alone.
  3. The other --configs (NF-RegNet-B0..B5 by default) at their own train
     image sizes.
  4. --loops: experiment.train_and_evaluate itself against the step alone
     (as benchmarks/train_loop.py), on fake in-memory data and on the real
     ImageNet pipeline (grain over array_record prepared by
     nfnets/prepare_imagenet.py from generated ILSVRC2012-layout tars of
     natural-looking JPEGs, training's default worker count); then
     --eval_dtypes: Experiment.evaluate_state (what training's evaluation
     runs) over --eval_images generated validation JPEGs, decoding
     included, against the same on in-memory uint8 arrays.

--budget_s bounds the whole run, compilation included: a case starts only
if --min_case_s are left (and, for group 3, --reserve_s more for group 4),
and its timed steps are cut to what the time left allows.

On a CPU, tiny sizes check that every case runs (tests/test_benchmarks.py):

  python -m benchmarks.gpu --allow_cpu --batch=8 --image_size=32 --steps=1 \
      --configs=quickstart --dtypes=float32 --matmul_size=64 \
      --loop_config=quickstart --loop_image_size=32 --loop_steps=3 \
      --loops=fake:float32,jpeg:float32 --jpeg_images=3 --num_workers=0 \
      --eval_dtypes=float32 --eval_images=8
"""

import dataclasses
import gc
import importlib.metadata
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback

from absl import flags
import jax
import jax.numpy as jnp

import experiment
from benchmarks import harness
from nfnets import backend
from nfnets import cli
from nfnets import counting
from nfnets import data as data_lib
from nfnets import errors

_REGNETS = [f'nf_regnet_b{i}' for i in range(6)]
_ALLOW_CPU = flags.DEFINE_bool(
    'allow_cpu', False, 'Run even when JAX runs on the CPU (for checking the '
    'script at tiny sizes; the numbers say nothing about an accelerator).')
_CONFIGS = flags.DEFINE_list(
    'configs', ['nf_resnet50', 'bn_resnet50'] + _REGNETS,
    'Config modules under configs/; bn_resnet50 runs once per --bn_orders.')
_BN_ORDERS = flags.DEFINE_list('bn_orders', ['bn_relu_conv', 'relu_bn_conv'],
                               'model.bn_order values for bn_resnet50.')
_DTYPES = flags.DEFINE_list('dtypes', ['bfloat16', 'float32'],
                            'config.compute_dtype values, each a case.')
_PRECISION = flags.DEFINE_string(
    'matmul_precision', '', "config.matmul_precision of every case ('highest',"
    " 'high' or 'default'); '' = each config's own.")
_BATCH = flags.DEFINE_integer('batch', 256, 'Global batch size (split over '
                              'all devices).')
_SIZE = flags.DEFINE_integer(
    'image_size', 0, "px; 0 = each config's own train size (224 for the "
    'ResNets, 192-384 for NF-RegNet-B0..B5).')
_STEPS = flags.DEFINE_integer('steps', 50, 'Timed train steps per case (after '
                              f'{harness.WARMUP_STEPS} warm-up steps).')
_LOOPS = flags.DEFINE_list(
    'loops', ['jpeg:bfloat16', 'fake:float32'],
    'End-to-end loop cases DATA:DTYPE of --loop_config (DATA fake = '
    'in-memory uint8 arrays, jpeg = the ImageNet pipeline on generated '
    'JPEGs); empty = none.')
_LOOP_CONFIG = flags.DEFINE_string('loop_config', 'nf_resnet50',
                                   'Config module of the loop and eval '
                                   'cases.')
_LOOP_STEPS = flags.DEFINE_integer('loop_steps', 100, 'Timed steps of each '
                                   'loop case (like train_loop.py --steps).')
_LOOP_SIZE = flags.DEFINE_integer('loop_image_size', 224, 'Loop and eval '
                                  'cases: px.')
_JPEG_IMAGES = flags.DEFINE_integer(
    'jpeg_images', 768, 'Train JPEGs generated for the jpeg loop (repeated '
    'over epochs, reshuffled each).')
_EVAL_DTYPES = flags.DEFINE_list(
    'eval_dtypes', ['bfloat16'], 'compute_dtype of each eval case (on '
    'generated JPEGs); empty = none.')
_EVAL_IMAGES = flags.DEFINE_integer(
    'eval_images', 1024, 'Validation JPEGs generated for the eval cases.')
_WORKERS = flags.DEFINE_integer('num_workers', -1, 'grain workers of the jpeg '
                                'loop; -1 = the training default '
                                '(data.resolve_num_workers).')
_MATMUL = flags.DEFINE_integer('matmul_size', 8192, 'N of the N x N x N bf16 '
                               'matrix product case; 0 = skip it.')
_PEAK = flags.DEFINE_float(
    'peak_tflops', 0, 'Dense bf16 peak of one device, TFLOP/s; 0 = from the '
    'built-in table by device kind.')
_BUDGET = flags.DEFINE_float('budget_s', 1500, 'Wall-clock budget of the '
                             'whole run, s, compilation included.')
_MIN_CASE = flags.DEFINE_float('min_case_s', 40, 'A case starts only with at '
                               'least this many seconds of budget left.')
_RESERVE = flags.DEFINE_float('reserve_s', 150, 'Seconds kept for the loop '
                              'and eval cases while group-3 configs run.')
_CASE_S = flags.DEFINE_float('case_s', 20, 'At most this many seconds of '
                             'timed steps per step case.')
_OUTDIR = flags.DEFINE_string(
    'outdir', '', 'Folder for gpu.json and gpu.md, created; one that holds '
    "results already is refused. '' = a new folder runs/gpu-<UTC date and "
    'time> under the current one.')
flags.DEFINE_alias('out_dir', 'outdir')
_CACHE_DIR = flags.DEFINE_string(
    'compilation_cache_dir', os.path.join(tempfile.gettempdir(),
                                          'nfnets_jax_cache'),
    "JAX's persistent compilation cache, so a loop case's repeated step "
    "timing reuses the loop's compiled step; '' = off.")

_CORE = ('nf_resnet50', 'bn_resnet50')
# Dense (no sparsity) bf16 tensor peaks of one device, TFLOP/s, from the
# vendors' datasheets, by a substring of jax's device_kind; first match wins.
_BF16_PEAK_TFLOPS = (
    ('H100 PCIe', 756), ('H100 NVL', 835), ('H200 NVL', 835), ('GH200', 989),
    ('H200', 989), ('H100', 989), ('A100', 312), ('L40S', 362), ('L40', 181),
    ('L4', 121), ('TPU v4', 275), ('TPU v5 lite', 197), ('TPU v5p', 459),
    ('TPU v6 lite', 918))
FLOPS_CONVENTION = (
    'train FLOPs per image = 3 x 2 x MACs: forward 2 x MACs, backward 2 x '
    'forward (input and weight gradients); MACs of every conv and linear '
    'layer at the case image size (nfnets/counting.py); weight '
    'standardization, normalization, activations, pooling and the optimizer '
    'are not counted. Fractions are of the dense bf16 peak (no sparsity) for '
    'every dtype.')
COLUMNS = ('case', 'dtype', 'px', 'images/s', 'ms/step', 'TFLOP/s',
           'of bf16 peak', 'NF/BN', 'end-to-end/step', 'note')
COLUMN_NOTES = (
    'NF/BN: nf_resnet50 train images/s over this BatchNorm row\'s, same '
    'dtype (goal >= 1.0). end-to-end/step: loop rows, '
    'experiment.train_and_evaluate (data pipeline, transfer, step, logging) '
    'over its compiled step alone on a batch already on the devices (goal '
    '>= 0.9); eval rows, Experiment.evaluate_state on JPEGs (decoding '
    'included) over the same on in-memory uint8 arrays. Loop and eval '
    'images/s are those end-to-end rates.')


@dataclasses.dataclass
class Case:
  label: str         # e.g. 'train bn_resnet50 (relu_bn_conv)'
  dtype: str         # compute dtype
  kind: str          # 'matmul', 'step', 'loop' or 'eval'
  group: int         # 1-4, see the module docstring
  config: object = None
  data: str = ''     # loop and eval cases: 'fake' or 'jpeg'

  @property
  def name(self) -> str:
    return f'{self.label} {self.dtype}'


def bf16_peak_tflops(device_kind: str) -> float | None:
  """The dense bf16 peak of one device, or None for an unknown kind."""
  if _PEAK.value:
    return _PEAK.value
  for substring, tflops in _BF16_PEAK_TFLOPS:
    if substring in device_kind:
      return float(tflops)
  return None


def check_backend() -> None:
  """UserError when JAX runs on the CPU, unless --allow_cpu."""
  if jax.default_backend() != 'cpu' or _ALLOW_CPU.value:
    return
  warning = backend.accelerator_warning()
  anyway = ('this benchmark measures GPUs and TPUs (--allow_cpu runs it on '
            'the CPU anyway, at tiny sizes as the tests do)')
  raise errors.UserError(
      f'{anyway[0].upper()}{anyway[1:]}. {warning}' if warning else
      f'JAX runs on the CPU ({backend.describe()}); {anyway}: install JAX '
      'for yours, see docs/accelerators.md.')


def _check_flags() -> None:
  for name, value in (('batch', _BATCH.value), ('steps', _STEPS.value),
                      ('jpeg_images', _JPEG_IMAGES.value),
                      ('eval_images', _EVAL_IMAGES.value)):
    if value < 1:
      raise errors.UserError(f'--{name} must be >= 1, got {value}.')
  if _BATCH.value % jax.device_count():
    raise errors.UserError(
        f'--batch={_BATCH.value} is not divisible by the '
        f'{jax.device_count()} devices; use a multiple of '
        f'{jax.device_count()}.')
  for name, value in (('image_size', _SIZE.value),
                      ('loop_image_size', _LOOP_SIZE.value)):
    if value and value < 32:  # 0 = the config's own (image_size only)
      raise errors.UserError(f'--{name}={value}: images must be at least '
                             '32 px (the networks downsample by 32).')
  for name, value in (('budget_s', _BUDGET.value), ('case_s', _CASE_S.value)):
    if value <= 0:
      raise errors.UserError(f'--{name} must be > 0, got {value}.')
  for name, value in (('matmul_size', _MATMUL.value),
                      ('peak_tflops', _PEAK.value),
                      ('min_case_s', _MIN_CASE.value),
                      ('reserve_s', _RESERVE.value)):
    if value < 0:
      raise errors.UserError(f'--{name} must be >= 0, got {value}.')
  for name, dtypes in (('dtypes', _DTYPES.value),
                       ('eval_dtypes', _EVAL_DTYPES.value)):
    for dtype in dtypes:
      if dtype not in experiment.COMPUTE_DTYPES:
        raise errors.UserError(f'--{name}: unknown {dtype!r}; allowed: '
                               f'{tuple(experiment.COMPUTE_DTYPES)}.')
  outdir = _OUTDIR.value
  if outdir and os.path.exists(outdir) and not os.path.isdir(outdir):
    raise errors.UserError(f'--outdir={outdir} is a file, not a folder.')
  for name in ('gpu.json', 'gpu.md'):
    if outdir and os.path.exists(os.path.join(outdir, name)):
      raise errors.UserError(f'--outdir={outdir} already holds results '
                             f'({name}); name a new folder.')


def _new_outdir() -> str:
  """--outdir, or a new folder runs/gpu-<UTC date and time>."""
  if _OUTDIR.value:
    return _OUTDIR.value
  base = os.path.join('runs', time.strftime('gpu-%Y%m%d-%H%M%S',
                                            time.gmtime()))
  path, count = base, 1
  while os.path.exists(path):
    count += 1
    path = f'{base}-{count}'
  return path


def _load(name: str):
  """configs/<name>.py's config with --matmul_precision applied."""
  config = harness.load_config(name)
  if _PRECISION.value:
    config.matmul_precision = _PRECISION.value  # validated with the config
  return config


def _step_config(name: str, dtype: str, bn_order: str | None = None):
  """A config for timing the train step on fake uint8 batches."""
  config = _load(name)
  if bn_order is not None:
    config.model.bn_order = bn_order
  try:
    return harness.fake_config(config, _BATCH.value,
                               _SIZE.value or config.data.image_size, dtype)
  except errors.UserError as e:
    raise errors.UserError(f'{name} ({dtype}): {e}') from None


def _pipeline_config(data: str, dtype: str):
  """--loop_config for train_and_evaluate and evaluate_state on fake arrays
  or on prepared JPEGs (data_dir set once they are prepared)."""
  config = _load(_LOOP_CONFIG.value)
  config.compute_dtype = dtype
  config.data.image_size = _LOOP_SIZE.value
  config.data.eval_image_size = 0
  if data == 'fake':  # as train_loop.py --data=fake
    config.data.update(dict(name='fake', fake_train_size=1024,
                            fake_eval_size=256))
  else:
    config.data.update(dict(name='imagenet2012', num_workers=_WORKERS.value,
                            num_classes=1000))
    config.model.num_classes = 1000  # ImageNet's (set for any config)
    config.eval_split = 'validation'
  config.train.update(dict(batch_size=_BATCH.value,
                           eval_batch_size=_BATCH.value))
  harness.set_loop_steps(config, _LOOP_STEPS.value)
  try:
    experiment.validate_config(config)  # reads no data
  except errors.UserError as e:
    raise errors.UserError(f'{_LOOP_CONFIG.value} ({dtype}): {e}') from None
  return config


def plan_cases() -> list[Case]:
  """Every case, in run order; raises UserError for any bad input before
  anything is compiled."""
  _check_flags()
  cases = []
  if _MATMUL.value:
    cases.append(Case(f'matmul {_MATMUL.value}^3', 'bfloat16', 'matmul', 1))
  core = [n for n in _CORE if n in _CONFIGS.value]
  others = [n for n in _CONFIGS.value if n not in _CORE]
  for group, names in ((2, core), (3, others)):
    for dtype in _DTYPES.value:
      for name in names:
        orders = _BN_ORDERS.value if name == 'bn_resnet50' else [None]
        for order in orders:
          label = f'train {name}' + (f' ({order})' if order else '')
          cases.append(Case(label, dtype, 'step', group,
                            _step_config(name, dtype, order)))
  for spec in _LOOPS.value:
    data, _, dtype = spec.partition(':')
    if data not in ('fake', 'jpeg') or dtype not in experiment.COMPUTE_DTYPES:
      raise errors.UserError(
          f'--loops: bad {spec!r}; expected DATA:DTYPE with DATA fake or '
          f'jpeg and DTYPE one of {tuple(experiment.COMPUTE_DTYPES)}.')
    cases.append(Case(f'loop {_LOOP_CONFIG.value} {data}', dtype, 'loop', 4,
                      _pipeline_config(data, dtype), data))
  for dtype in _EVAL_DTYPES.value:
    cases.append(Case(f'eval {_LOOP_CONFIG.value} jpeg', dtype, 'eval', 4,
                      _pipeline_config('jpeg', dtype), 'jpeg'))
  return cases


def _package_versions() -> dict:
  """Versions of the installed packages that decide the numbers."""
  versions = {}
  for name in ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda13-plugin',
               'libtpu', 'dm-haiku', 'optax', 'numpy', 'grain',
               'tensorflow-datasets'):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


class Report:
  """Results so far, rewritten to outdir after every case: gpu.json (every
  number) and gpu.md (the table)."""

  def __init__(self, outdir: str, cases: list[Case], device_kind: str,
               peak: float | None):
    self.outdir, self.cases, self.peak = outdir, cases, peak
    self.header = dict(
        backend=backend.describe(), device_kind=device_kind,
        device_count=jax.device_count(), platform=jax.default_backend(),
        jax=jax.__version__, python=sys.version.split()[0],
        packages=_package_versions(), cpu_cores=harness.cpu_count(),
        batch=_BATCH.value, bf16_peak_tflops_per_device=peak,
        peak_source=('--peak_tflops' if _PEAK.value else
                     'datasheet, dense, no sparsity' if peak else
                     'unknown device kind: fraction of peak not computed'),
        flops_convention=FLOPS_CONVENTION)
    self.rows, self.skipped = {}, {}  # by case name
    os.makedirs(outdir, exist_ok=True)

  def ratios(self) -> list[dict]:
    """NF/BN step images/s per dtype and BatchNorm ordering."""
    rates = {r['case']: r['images_per_second'] for r in self.rows.values()
             if r['kind'] == 'step'}
    found = []
    for dtype in _DTYPES.value:
      nf = rates.get(f'train nf_resnet50 {dtype}')
      for order in _BN_ORDERS.value:
        bn = rates.get(f'train bn_resnet50 ({order}) {dtype}')
        if nf and bn:
          found.append(dict(dtype=dtype, bn_order=order, nf_over_bn=nf / bn))
    return found

  def add(self, row: dict) -> None:
    self.rows[row['case']] = row
    self._write()

  def skip(self, case: Case, reason: str) -> None:
    self.skipped[case.name] = reason
    self._write()

  def _write(self) -> None:
    result = dict(self.header, cases=list(self.rows.values()),
                  nf_over_bn=self.ratios(),
                  skipped=[dict(case=name, reason=reason)
                           for name, reason in self.skipped.items()])
    for name, text in (('gpu.json', json.dumps(result, indent=1)),
                       ('gpu.md', self.markdown())):
      path = os.path.join(self.outdir, name)
      with open(path + '.tmp', 'w') as f:
        f.write(text + '\n')
      os.replace(path + '.tmp', path)  # a cut-off run leaves whole files

  def _cells(self, case: Case) -> list:
    """The table row of a case: measured, skipped or not yet measured."""
    cells = [case.label, case.dtype] + [''] * (len(COLUMNS) - 2)
    row = self.rows.get(case.name)
    if row is None:
      cells[-1] = (f'skipped: {self.skipped[case.name]}'
                   if case.name in self.skipped else 'not measured yet')
      return [str(cell).replace('|', '/') for cell in cells]
    fraction = row.get('fraction_of_peak')
    notes = [row['note']] if row['note'] else []
    if row['kind'] in ('matmul', 'step'):
      cells[4:7] = [f'{1e3 * row["seconds_per_step"]:.1f}',
                    f'{row["tflops"]:.1f}',
                    '' if fraction is None else f'{100 * fraction:.1f}%']
    if row['kind'] == 'step':
      cells[2:4] = [row['image_size'], f'{row["images_per_second"]:,.0f}']
      nf = self.rows.get(f'train nf_resnet50 {case.dtype}')
      if nf and case.label.startswith('train bn_resnet50'):
        cells[7] = f'{nf["images_per_second"] / row["images_per_second"]:.3f}'
      notes.insert(0, f'{row["steps"]} timed steps, setup+compile '
                   f'{row["setup_seconds"]:.0f} s')
      if case.dtype == 'float32':
        notes.insert(1, f'matmul precision {row["matmul_precision"]}')
    elif row['kind'] == 'loop':
      rate = row['loop_images_per_second']
      cells[2:5] = [row['image_size'], f'{rate:,.0f}',
                    f'{1e3 * _BATCH.value / rate:.1f}']
      cells[8] = f'{row["loop_over_step"]:.3f}'
      notes.insert(0, f'step alone {row["step_images_per_second"]:,.0f} '
                   f'images/s, data wait '
                   f'{100 * row["data_wait_fraction"]:.0f}%, workers '
                   f'{row["num_workers"]}')
    elif row['kind'] == 'eval':
      rate = row['images_per_second']
      cells[2:5] = [row['image_size'], f'{rate:,.0f}',
                    f'{1e3 * _BATCH.value / rate:.1f}']
      cells[8] = f'{row["jpeg_over_memory"]:.3f}'
      notes.insert(0, f'{row["examples"]} JPEGs per pass; in-memory arrays '
                   f'{row["memory_images_per_second"]:,.0f} images/s')
    cells[9] = '; '.join(notes)
    return [str(cell).replace('|', '/') for cell in cells]  # | ends a cell

  def markdown(self) -> str:
    h = self.header
    per_device = h['batch'] // h['device_count']
    peak = h['bf16_peak_tflops_per_device']
    lines = [
        f'{h["backend"]}; {h["cpu_cores"]} CPU cores; global batch '
        f'{h["batch"]} ({per_device} per device); bf16 peak '
        + (f'{peak:g} TFLOP/s per device ({h["peak_source"]}).' if peak
           else f'unknown ({h["peak_source"]}).'), '',
        harness.markdown_table(COLUMNS, [self._cells(c) for c in self.cases]),
        '', COLUMN_NOTES, '', FLOPS_CONVENTION]
    return '\n'.join(lines)


def _throughput(flops_per_second: float, peak: float | None) -> dict:
  """TFLOP/s and its fraction of peak (TFLOP/s of the devices used)."""
  return dict(tflops=flops_per_second / 1e12,
              fraction_of_peak=flops_per_second / 1e12 / peak if peak
              else None)


def run_matmul(case: Case, peak: float | None) -> dict:
  n = _MATMUL.value
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys)
  product = jax.jit(jnp.matmul)
  repeats = 10
  seconds = harness.time_calls(lambda: product(a, b), repeats,
                               warmup=1) / repeats
  return dict(case=case.name, kind='matmul', seconds_per_step=seconds,
              steps=repeats, note='one device, random normal inputs',
              **_throughput(2 * n**3 / seconds, peak))


def run_step(case: Case, peak: float | None, max_seconds: float) -> dict:
  config = case.config
  size = config.data.image_size
  _, macs = counting.count_params_and_macs(config.model, size)
  timing = harness.time_loop_step(config, _STEPS.value, max_seconds)
  rate = timing.images_per_second
  return dict(case=case.name, kind='step', image_size=size,
              images_per_second=rate,
              seconds_per_step=timing.seconds_per_step, steps=timing.steps,
              setup_seconds=timing.setup_seconds, mean_loss=timing.mean_loss,
              gmacs_per_image=macs / 1e9,
              matmul_precision=config.get('matmul_precision'), note=(
                  '' if math.isfinite(timing.mean_loss) else 'LOSS NOT FINITE'),
              **_throughput(6 * macs * rate,
                            peak and peak * jax.device_count()))


class GeneratedJpegs:
  """ILSVRC2012-layout JPEGs prepared once (harness.prepare_jpegs) for the
  jpeg loop and eval cases, removed by close()."""

  def __init__(self, train_images: int, val_images: int):
    self.train_images, self.val_images = train_images, val_images
    self.root = self.data_dir = None

  def get(self) -> tuple[str, str]:
    """(the tfds data_dir, a note on how they were made if this call
    prepared them, else '')."""
    if self.data_dir is not None:
      return self.data_dir, ''
    start = time.perf_counter()
    self.root = tempfile.mkdtemp(prefix='nfnets_gpu_')
    self.data_dir, images = harness.prepare_jpegs(self.root,
                                                  self.train_images,
                                                  num_val=self.val_images)
    return self.data_dir, (
        f'{images} train + {self.val_images} validation JPEGs (240x320 to '
        '500x500 px, 20-60 KB; ImageNet averages ~110 KB) generated and '
        f'prepared in {time.perf_counter() - start:.0f} s')

  def close(self) -> None:
    if self.root:
      shutil.rmtree(self.root, ignore_errors=True)


def run_loop(case: Case, jpegs: GeneratedJpegs, deadline: float) -> dict:
  """Step, loop, step (the second step timing only if time is left, from
  the compilation cache); the ratio uses the mean of the step timings."""
  config, notes = case.config, []
  if case.data == 'jpeg':
    config.data.data_dir, prepared = jpegs.get()
    notes += [prepared] if prepared else []
  steps = [harness.time_loop_step(config, _LOOP_STEPS.value, _CASE_S.value)]
  loop, wait = harness.loop_images_per_second(config)
  if deadline - time.time() > steps[0].setup_seconds + _CASE_S.value + 10:
    steps.append(harness.time_loop_step(config, _LOOP_STEPS.value,
                                        _CASE_S.value))
  else:
    notes.append('one step timing (no time for the second)')
  step = sum(s.images_per_second for s in steps) / len(steps)
  return dict(case=case.name, kind='loop', image_size=config.data.image_size,
              num_workers=(data_lib.resolve_num_workers(config.data)
                           if case.data == 'jpeg' else 'in-memory'),
              step_images_per_second=step, step_timings=[
                  s.images_per_second for s in steps],
              # The second is small when the compilation cache worked.
              step_setup_seconds=[s.setup_seconds for s in steps],
              loop_images_per_second=loop, loop_over_step=loop / step,
              data_wait_fraction=wait, loop_steps=_LOOP_STEPS.value,
              note='; '.join(notes))


def time_evaluation(config) -> tuple[float, float, int]:
  """(images/s, compile-and-first-pass seconds, examples) of
  Experiment.evaluate_state over config.eval_split with freshly initialized
  parameters: one untimed pass (compilation, file cache), one timed."""
  exp = experiment.Experiment(config)
  state = exp.init_state()
  start = time.perf_counter()
  exp.evaluate_state(state, config.eval_split)
  first = time.perf_counter() - start
  start = time.perf_counter()
  metrics = exp.evaluate_state(state, config.eval_split)  # host floats
  seconds = time.perf_counter() - start
  return metrics['examples'] / seconds, first, int(metrics['examples'])


def run_eval(case: Case, jpegs: GeneratedJpegs) -> dict:
  """Evaluation on the generated validation JPEGs against the same on
  in-memory uint8 arrays of as many images (no decoding)."""
  config = case.config
  config.data.data_dir, prepared = jpegs.get()
  notes = [prepared] if prepared else []
  rate, first, examples = time_evaluation(config)
  in_memory = config.copy_and_resolve_references()
  in_memory.data.update(dict(name='fake', num_workers=0,
                             fake_train_size=_BATCH.value,
                             fake_eval_size=examples))
  memory_rate, _, _ = time_evaluation(in_memory)
  return dict(case=case.name, kind='eval', image_size=config.data.image_size,
              images_per_second=rate, memory_images_per_second=memory_rate,
              jpeg_over_memory=rate / memory_rate, examples=examples,
              first_pass_seconds=first, note='; '.join(notes))


def _describe(row: dict) -> str:
  """One progress line for a measured case."""
  if row['kind'] == 'loop':
    return (f'step {row["step_images_per_second"]:,.0f} images/s, loop '
            f'{row["loop_images_per_second"]:,.0f} images/s, loop/step '
            f'{row["loop_over_step"]:.3f}, data wait '
            f'{100 * row["data_wait_fraction"]:.0f}%, workers '
            f'{row["num_workers"]}' + (f' ({row["note"]})' if row['note']
                                       else ''))
  if row['kind'] == 'eval':
    return (f'{row["images_per_second"]:,.0f} images/s on JPEGs, '
            f'{row["memory_images_per_second"]:,.0f} on in-memory arrays, '
            f'{row["examples"]} images per pass, first pass (compilation) '
            f'{row["first_pass_seconds"]:.0f} s'
            + (f' ({row["note"]})' if row['note'] else ''))
  fraction = row['fraction_of_peak']
  text = (f'{1e3 * row["seconds_per_step"]:.1f} ms/step x {row["steps"]}, '
          f'{row["tflops"]:.1f} TFLOP/s, '
          + ('fraction of peak not computed' if fraction is None else
             f'{100 * fraction:.1f}% of bf16 peak'))
  if row['kind'] == 'step':
    text = (f'{row["images_per_second"]:,.1f} images/s at '
            f'{row["image_size"]} px, {text}, {row["gmacs_per_image"]:.2f} '
            f'GMACs/img, setup+compile {row["setup_seconds"]:.0f} s, loss '
            f'{row["mean_loss"]:.3f}' + (f' {row["note"]}' if row['note']
                                        else ''))
  return text


def main(argv):
  del argv
  start = time.time()
  deadline = start + _BUDGET.value
  check_backend()
  cases = plan_cases()
  print(backend.describe(), flush=True)
  warning = backend.accelerator_warning()
  if warning:  # on the CPU with --allow_cpu
    print(warning, flush=True)
  if _CACHE_DIR.value:
    jax.config.update('jax_compilation_cache_dir', _CACHE_DIR.value)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  device_kind = jax.devices()[0].device_kind
  peak = bf16_peak_tflops(device_kind)
  report = Report(_new_outdir(), cases, device_kind, peak)
  print(f'{report.header["cpu_cores"]} CPU cores; bf16 peak: '
        + (f'{peak:g} TFLOP/s per device ({report.header["peak_source"]})'
           if peak else report.header['peak_source'])
        + f'; {len(cases)} cases, budget {_BUDGET.value:.0f} s; results in '
        f'{report.outdir}', flush=True)
  print(FLOPS_CONVENTION, flush=True)
  jpegs = GeneratedJpegs(_JPEG_IMAGES.value, _EVAL_IMAGES.value if any(
      c.kind == 'eval' for c in cases) else 8)
  try:
    for index, case in enumerate(cases):
      left = deadline - time.time()
      pipeline_pending = any(c.group == 4 for c in cases[index:])
      reserve = _RESERVE.value if case.group == 3 and pipeline_pending else 0
      if left - reserve < _MIN_CASE.value:
        reason = (f'{left:.0f} s of the budget left' + (
            f', {reserve:.0f} s of it kept for the loop and eval cases'
            if reserve else '') + f'; a case needs {_MIN_CASE.value:.0f} s')
        print(f'[{case.name}] skipped: {reason}', flush=True)
        report.skip(case, reason)
        continue
      print(f'[{case.name}] starting, {left:.0f} s of the budget left',
            flush=True)
      case_start = time.time()
      try:
        if case.kind == 'matmul':
          row = run_matmul(case, peak)
        elif case.kind == 'step':
          row = run_step(case, peak, min(_CASE_S.value, max(
              1.0, (left - reserve) / 4)))
        elif case.kind == 'loop':
          row = run_loop(case, jpegs, deadline)
        else:
          row = run_eval(case, jpegs)
      except Exception as e:  # pylint: disable=broad-except
        # One failed case (out of memory, say) must not cost the others.
        traceback.print_exc()
        reason = f'failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}'
        print(f'[{case.name}] {reason}', flush=True)
        report.skip(case, reason)
        continue
      finally:
        gc.collect()  # frees device buffers held in reference cycles
      row['wall_seconds'] = time.time() - case_start
      print(f'[{case.name}] {_describe(row)}; {row["wall_seconds"]:.0f} s',
            flush=True)
      report.add(row)
  finally:
    jpegs.close()
  print(f'\ndone in {time.time() - start:.0f} s of a {_BUDGET.value:.0f} s '
        f'budget; results in {report.outdir}/ (gpu.json, gpu.md)\n',
        flush=True)
  print(report.markdown(), flush=True)


if __name__ == '__main__':
  cli.run(main)

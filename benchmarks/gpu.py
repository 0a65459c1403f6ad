"""One accelerator benchmark run: train images/s, NF/BN ratios, fraction of
the bf16 peak, and the training loop end to end.

Runs wherever the project's requirements and a JAX for the accelerator are
installed, from the repository root:

  pip install -r requirements.txt
  pip install "jax[cuda12]==0.10.2"              # NVIDIA GPUs
  python -m benchmarks.gpu                       # -> runs/gpu-<UTC time>/
  python -m benchmarks.gpu --outdir=DIR --budget_s=300

Cases, in order of importance, each printed as soon as it is measured and
written to --outdir (gpu.json, gpu.md) after every case, so a run cut short
keeps what it measured; the report (gpu.md) is printed at the end:

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
     natural-looking JPEGs, one grain worker per CPU core).

--budget_s bounds the whole run, compilation included: a case starts only
if --min_case_s are left (and, for group 3, --reserve_s more for the loops),
and its timed steps are cut to what the time left allows.

On a CPU, tiny sizes check that every case runs (tests/test_benchmarks.py):

  python -m benchmarks.gpu --batch=8 --image_size=32 --steps=1 \
      --configs=quickstart --dtypes=float32 --matmul_size=64 \
      --loop_config=quickstart --loop_image_size=32 --loop_steps=3 \
      --loops=fake:float32,jpeg:float32 --jpeg_images=3 --num_workers=0
"""

import dataclasses
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
from nfnets import cli
from nfnets import counting
from nfnets import errors

_REGNETS = [f'nf_regnet_b{i}' for i in range(6)]
_CONFIGS = flags.DEFINE_list(
    'configs', ['nf_resnet50', 'bn_resnet50'] + _REGNETS,
    'Config modules under configs/; bn_resnet50 runs once per --bn_orders.')
_BN_ORDERS = flags.DEFINE_list('bn_orders', ['bn_relu_conv', 'relu_bn_conv'],
                               'model.bn_order values for bn_resnet50.')
_DTYPES = flags.DEFINE_list('dtypes', ['bfloat16', 'float32'],
                            'config.compute_dtype values, each a case.')
_BATCH = flags.DEFINE_integer('batch', 256, 'Global batch size.')
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
                                   'Config module of the loop cases.')
_LOOP_STEPS = flags.DEFINE_integer('loop_steps', 100, 'Timed steps of each '
                                   'loop case (like train_loop.py --steps).')
_LOOP_SIZE = flags.DEFINE_integer('loop_image_size', 224, 'Loop cases: px.')
_JPEG_IMAGES = flags.DEFINE_integer(
    'jpeg_images', 768, 'JPEGs generated for the jpeg loop (repeated over '
    'epochs, reshuffled each).')
_WORKERS = flags.DEFINE_integer('num_workers', -1, 'grain workers of the jpeg '
                                'loop; -1 = one per CPU core.')
_MATMUL = flags.DEFINE_integer('matmul_size', 8192, 'N of the N x N x N bf16 '
                               'matrix product case; 0 = skip it.')
_PEAK = flags.DEFINE_float(
    'peak_tflops', 0, 'Dense bf16 peak of one device, TFLOP/s; 0 = from the '
    'built-in table by device kind.')
_BUDGET = flags.DEFINE_float('budget_s', 480, 'Wall-clock budget of the '
                             'whole run, s, compilation included.')
_MIN_CASE = flags.DEFINE_float('min_case_s', 40, 'A case starts only with at '
                               'least this many seconds of budget left.')
_RESERVE = flags.DEFINE_float('reserve_s', 150, 'Seconds kept for the loop '
                              'cases while group-3 configs run.')
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
    'every dtype; float32 runs at JAX\'s default matmul precision.')


@dataclasses.dataclass
class Case:
  name: str          # e.g. 'bn_resnet50/relu_bn_conv bfloat16'
  kind: str          # 'matmul', 'step' or 'loop'
  group: int         # 1-4, see the module docstring
  config: object = None
  data: str = ''     # loop cases: 'fake' or 'jpeg'


def bf16_peak_tflops(device_kind: str) -> float | None:
  """The dense bf16 peak of one device, or None for an unknown kind."""
  if _PEAK.value:
    return _PEAK.value
  for substring, tflops in _BF16_PEAK_TFLOPS:
    if substring in device_kind:
      return float(tflops)
  return None


def _check_flags() -> None:
  for name, value in (('batch', _BATCH.value), ('steps', _STEPS.value),
                      ('jpeg_images', _JPEG_IMAGES.value)):
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
  for dtype in _DTYPES.value:
    if dtype not in experiment.COMPUTE_DTYPES:
      raise errors.UserError(f'--dtypes: unknown {dtype!r}; allowed: '
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


def _step_config(name: str, dtype: str, bn_order: str | None = None):
  """A config for timing the train step on fake uint8 batches."""
  config = harness.load_config(name)
  if bn_order is not None:
    config.model.bn_order = bn_order
  try:
    return harness.fake_config(config, _BATCH.value,
                               _SIZE.value or config.data.image_size, dtype)
  except errors.UserError as e:
    raise errors.UserError(f'{name} ({dtype}): {e}') from None


def _loop_config(data: str, dtype: str):
  """--loop_config for train_and_evaluate on fake arrays or on prepared
  JPEGs (data_dir set once they are prepared)."""
  config = harness.load_config(_LOOP_CONFIG.value)
  config.compute_dtype = dtype
  config.data.image_size = _LOOP_SIZE.value
  config.data.eval_image_size = 0
  if data == 'fake':  # as train_loop.py --data=fake
    config.data.update(dict(name='fake', fake_train_size=1024,
                            fake_eval_size=256))
  else:
    workers = _WORKERS.value if _WORKERS.value >= 0 else harness.cpu_count()
    config.data.update(dict(name='imagenet2012', num_workers=workers,
                            num_classes=1000))
    config.model.num_classes = 1000  # ImageNet's (set for any config)
    config.eval_split = 'validation'
  config.train.update(dict(batch_size=_BATCH.value,
                           eval_batch_size=_BATCH.value))
  harness.set_loop_steps(config, _LOOP_STEPS.value)
  experiment.validate_config(config)  # reads no data
  return config


def plan_cases() -> list[Case]:
  """Every case, in run order; raises UserError for any bad input before
  anything is compiled."""
  _check_flags()
  cases = []
  if _MATMUL.value:
    cases.append(Case(f'matmul {_MATMUL.value}^3 bfloat16', 'matmul', 1))
  core = [n for n in _CORE if n in _CONFIGS.value]
  others = [n for n in _CONFIGS.value if n not in _CORE]
  for group, names in ((2, core), (3, others)):
    for dtype in _DTYPES.value:
      for name in names:
        orders = _BN_ORDERS.value if name == 'bn_resnet50' else [None]
        for order in orders:
          label = f'{name}/{order}' if order else name
          cases.append(Case(f'{label} {dtype}', 'step', group,
                            _step_config(name, dtype, order)))
  for spec in _LOOPS.value:
    data, _, dtype = spec.partition(':')
    if data not in ('fake', 'jpeg') or dtype not in experiment.COMPUTE_DTYPES:
      raise errors.UserError(
          f'--loops: bad {spec!r}; expected DATA:DTYPE with DATA fake or '
          f'jpeg and DTYPE one of {tuple(experiment.COMPUTE_DTYPES)}.')
    cases.append(Case(f'loop {_LOOP_CONFIG.value} {data} {dtype}', 'loop', 4,
                      _loop_config(data, dtype), data))
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
  """Results so far, rewritten to outdir after every case."""

  def __init__(self, outdir: str, device_kind: str, peak: float | None):
    self.outdir = outdir
    self.peak = peak
    self.header = dict(
        device_kind=device_kind, device_count=jax.device_count(),
        platform=jax.devices()[0].platform, jax=jax.__version__,
        python=sys.version.split()[0], packages=_package_versions(),
        cpu_cores=harness.cpu_count(), batch=_BATCH.value,
        bf16_peak_tflops_per_device=peak,
        peak_source=('--peak_tflops' if _PEAK.value else
                     'datasheet, dense, no sparsity' if peak else
                     'unknown device kind: fraction of peak not computed'),
        flops_convention=FLOPS_CONVENTION)
    self.rows, self.skipped = [], []
    os.makedirs(outdir, exist_ok=True)

  def ratios(self) -> list[dict]:
    """NF/BN step images/s per dtype and BatchNorm ordering."""
    rates = {r['case']: r['images_per_second'] for r in self.rows
             if r['kind'] == 'step'}
    found = []
    for dtype in _DTYPES.value:
      nf = rates.get(f'nf_resnet50 {dtype}')
      for order in _BN_ORDERS.value:
        bn = rates.get(f'bn_resnet50/{order} {dtype}')
        if nf and bn:
          found.append(dict(dtype=dtype, bn_order=order, nf_over_bn=nf / bn))
    return found

  def add(self, row: dict) -> None:
    self.rows.append(row)
    self._write()

  def skip(self, case: Case, reason: str) -> None:
    self.skipped.append(dict(case=case.name, reason=reason))
    self._write()

  def _write(self) -> None:
    result = dict(self.header, cases=self.rows, nf_over_bn=self.ratios(),
                  skipped=self.skipped)
    for name, text in (('gpu.json', json.dumps(result, indent=1)),
                       ('gpu.md', self.markdown())):
      path = os.path.join(self.outdir, name)
      with open(path + '.tmp', 'w') as f:
        f.write(text + '\n')
      os.replace(path + '.tmp', path)  # a cut-off run leaves whole files

  def markdown(self) -> str:
    h = self.header
    rows = []
    for r in self.rows:
      if r['kind'] == 'loop':
        continue
      fraction = r['fraction_of_peak']
      step = r['kind'] == 'step'  # else matmul: no images, size or setup
      size, rate, gmacs, setup = (
          (str(r['image_size']), f'{r["images_per_second"]:,.0f}',
           f'{r["gmacs_per_image"]:.2f}', f'{r["setup_seconds"]:.0f}')
          if step else ('', '', '', ''))
      rows.append([r['case'], size, rate, f'{1e3 * r["seconds_per_step"]:.1f}',
                   r['steps'], gmacs, f'{r["tflops"]:.1f}',
                   '' if fraction is None else f'{100 * fraction:.1f}%',
                   setup, r['note']])
    lines = [f'{h["device_count"]} x {h["device_kind"]}, jax {h["jax"]}, '
             f'{h["cpu_cores"]} CPU cores, global batch {h["batch"]}; bf16 '
             f'peak {h["bf16_peak_tflops_per_device"]} TFLOP/s per device '
             f'({h["peak_source"]}).', '', harness.markdown_table(
                 ['case', 'px', 'images/s', 'ms/step', 'timed steps',
                  'GMACs/img', 'TFLOP/s', 'of bf16 peak', 'setup s', 'note'],
                 rows)]
    if self.ratios():
      lines += ['', harness.markdown_table(
          ['dtype', 'BN ordering', 'NF/BN step images/s (goal >= 1.0)'],
          [[q['dtype'], q['bn_order'], f'{q["nf_over_bn"]:.3f}']
           for q in self.ratios()])]
    loops = [r for r in self.rows if r['kind'] == 'loop']
    if loops:
      lines += ['', harness.markdown_table(
          ['loop case', 'workers', 'step images/s', 'loop images/s',
           'loop/step (goal >= 0.9)', 'data wait', 'note'],
          [[r['case'], r['num_workers'], f'{r["step_images_per_second"]:,.0f}',
            f'{r["loop_images_per_second"]:,.0f}',
            f'{r["loop_over_step"]:.3f}',
            f'{100 * r["data_wait_fraction"]:.0f}%', r['note']]
           for r in loops])]
    if self.skipped:
      lines += ['', 'Skipped: ' + '; '.join(
          f'{s["case"]} ({s["reason"]})' for s in self.skipped)]
    lines += ['', FLOPS_CONVENTION]
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
              gmacs_per_image=macs / 1e9, note=(
                  '' if math.isfinite(timing.mean_loss) else 'LOSS NOT FINITE'),
              **_throughput(6 * macs * rate,
                            peak and peak * jax.device_count()))


def run_loop(case: Case, deadline: float) -> dict:
  """Step, loop, step (the second step timing only if time is left, from
  the compilation cache); the ratio uses the mean of the step timings."""
  config, notes, root = case.config, [], None
  try:
    if case.data == 'jpeg':
      start = time.perf_counter()
      root = tempfile.mkdtemp(prefix='nfnets_gpu_')
      config.data.data_dir, images = harness.prepare_jpegs(
          root, _JPEG_IMAGES.value, num_val=8)
      notes.append(f'{images} generated JPEGs (240x320 to 500x500 px, '
                   f'20-60 KB; ImageNet averages ~110 KB) prepared in '
                   f'{time.perf_counter() - start:.0f} s')
    steps = [harness.time_loop_step(config, _LOOP_STEPS.value, _CASE_S.value)]
    loop, wait = harness.loop_images_per_second(config)
    if deadline - time.time() > steps[0].setup_seconds + _CASE_S.value + 10:
      steps.append(harness.time_loop_step(config, _LOOP_STEPS.value,
                                          _CASE_S.value))
    else:
      notes.append('one step timing (no time for the second)')
  finally:
    if root:
      shutil.rmtree(root, ignore_errors=True)
  step = sum(s.images_per_second for s in steps) / len(steps)
  return dict(case=case.name, kind='loop', image_size=config.data.image_size,
              num_workers=(config.data.num_workers if case.data == 'jpeg'
                           else 'in-memory'),
              step_images_per_second=step, step_timings=[
                  s.images_per_second for s in steps],
              # The second is small when the compilation cache worked.
              step_setup_seconds=[s.setup_seconds for s in steps],
              loop_images_per_second=loop, loop_over_step=loop / step,
              data_wait_fraction=wait, loop_steps=_LOOP_STEPS.value,
              note='; '.join(notes))


def _describe(row: dict) -> str:
  if row['kind'] == 'loop':
    return (f'step {row["step_images_per_second"]:,.0f} images/s, loop '
            f'{row["loop_images_per_second"]:,.0f} images/s, loop/step '
            f'{row["loop_over_step"]:.3f}, data wait '
            f'{100 * row["data_wait_fraction"]:.0f}%, workers '
            f'{row["num_workers"]}' + (f' ({row["note"]})' if row['note']
                                       else ''))
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
  cases = plan_cases()
  if _CACHE_DIR.value:
    jax.config.update('jax_compilation_cache_dir', _CACHE_DIR.value)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  device_kind = jax.devices()[0].device_kind
  peak = bf16_peak_tflops(device_kind)
  report = Report(_new_outdir(), device_kind, peak)
  print(f'devices: {jax.device_count()} x {device_kind} '
        f'({jax.devices()[0].platform}), jax {jax.__version__}; '
        f'{report.header["cpu_cores"]} CPU cores; bf16 peak: '
        + (f'{peak:g} TFLOP/s per device ({report.header["peak_source"]})'
           if peak else report.header['peak_source'])
        + f'; {len(cases)} cases, budget {_BUDGET.value:.0f} s; results in '
        f'{report.outdir}', flush=True)
  print(FLOPS_CONVENTION, flush=True)
  for index, case in enumerate(cases):
    left = deadline - time.time()
    loops_pending = any(c.kind == 'loop' for c in cases[index:])
    reserve = _RESERVE.value if case.group == 3 and loops_pending else 0
    if left - reserve < _MIN_CASE.value:
      reason = (f'{left:.0f} s of the budget left' + (
          f', {reserve:.0f} s of it kept for the loop cases' if reserve
          else '') + f'; a case needs {_MIN_CASE.value:.0f} s')
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
      else:
        row = run_loop(case, deadline)
    except Exception as e:  # pylint: disable=broad-except
      # One failed case (out of memory, say) must not cost the others.
      traceback.print_exc()
      reason = f'failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}'
      print(f'[{case.name}] {reason}', flush=True)
      report.skip(case, reason)
      continue
    row['wall_seconds'] = time.time() - case_start
    print(f'[{case.name}] {_describe(row)}; {row["wall_seconds"]:.0f} s',
          flush=True)
    report.add(row)
  print(f'\ndone in {time.time() - start:.0f} s of a {_BUDGET.value:.0f} s '
        f'budget; results in {report.outdir}/ (gpu.json, gpu.md)\n',
        flush=True)
  print(report.markdown(), flush=True)


if __name__ == '__main__':
  cli.run(main)
